SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call8.sh .gpu-run/launch_probe.py .gpu-run/store_stages.py $OUT/
git log --oneline -1 > $OUT/tree.txt; git diff --stat >> $OUT/tree.txt
for r in 1 2; do
  PYTHONPATH=$PWD/.gpu-run/head timeout 40 python .gpu-run/store_stages.py $OUT/stages_head_$r.json > $OUT/stages_head_$r.log 2>&1
  PYTHONPATH=$PWD timeout 40 python .gpu-run/store_stages.py $OUT/stages_new_$r.json > $OUT/stages_new_$r.log 2>&1
done
for r in 1 2; do
  PYTHONPATH=$PWD/.gpu-run/head timeout 60 python experiments/results/h200/session-2026-12-05d/planned/churned_store.py $OUT/churned_head_$r.json > $OUT/churned_head_$r.log 2>&1
  PYTHONPATH=$PWD timeout 60 python experiments/results/h200/session-2026-12-05d/planned/churned_store.py $OUT/churned_new_$r.json > $OUT/churned_new_$r.log 2>&1
done
PYTHONPATH=$PWD timeout 130 python -m experiments.hot_path --out $OUT/hp --max-mib 4000 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
timeout 40 python .gpu-run/launch_probe.py $OUT > $OUT/launch_probe.log 2>&1; echo "rc=$?" >> $OUT/launch_probe.log
PYTHONPATH=$PWD timeout 260 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=8 tests/test_block_cache.py tests/test_pool.py tests/test_quantized_blocks.py tests/test_engine_robustness.py tests/test_engine.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; for f in $OUT/stages_*_3.log; do echo $f; cut -c1-200 $f; done; grep '"case"' $OUT/hp.log | cut -c1-120; tail -2 $OUT/hp.log; tail -3 $OUT/launch_probe.log | cut -c1-200; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -15
