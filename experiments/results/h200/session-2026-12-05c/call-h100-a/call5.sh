SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call5.sh $OUT/
R=experiments/results/cuda-thread-end/repro.py
for round in 1 2 3; do for mode in clear end_thread alive; do
  PYTHONPATH=$PWD timeout 60 python $R $mode --iters 30 >> $OUT/repro.log 2>&1; echo "round $round $mode rc=$?" >> $OUT/repro.log
done; done
PYTHONPATH=$PWD timeout 400 python -X faulthandler -m pytest -v -p no:cacheprovider --durations=20 tests/test_engine_robustness.py tests/test_engine.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; grep -E "rc=|worker threads|what\(\)" $OUT/repro.log | cut -c1-300; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal|what\(\)" $OUT/pytest.log | tail -25
