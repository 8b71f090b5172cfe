SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
timeout 120 python experiments/results/h200/session-2026-12-05/probe_store.py $OUT > $OUT/probe_store.log 2>&1; echo "probe rc=$?" >> $OUT/probe_store.log
timeout 420 python -m pytest -q -p no:cacheprovider tests/test_persistence.py tests/test_persistence_file_format.py tests/test_persistence_support.py tests/test_persistence_crash.py tests/test_persistence_models.py tests/test_quantized_blocks.py tests/test_split_for_device.py tests/test_local_models.py > $OUT/pytest_2.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_2.log
cat $OUT/gpu.txt; tail -6 $OUT/probe_store.log; grep -E "passed|failed|FAILED|ERROR" $OUT/pytest_2.log | tail -15
