SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/plan_probe.py .gpu-run/call3.sh $OUT/
timeout 140 python .gpu-run/plan_probe.py $OUT > $OUT/probe.log 2>&1; echo "probe rc=$?" >> $OUT/probe.log
timeout 420 python -m pytest -q -p no:cacheprovider tests/test_block_cache.py tests/test_pool.py tests/test_engine_robustness.py tests/test_engine.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; grep -v "^ " $OUT/probe.log | cut -c1-900; grep -E "passed|failed|FAILED|ERROR|rc=" $OUT/pytest.log | tail -15
