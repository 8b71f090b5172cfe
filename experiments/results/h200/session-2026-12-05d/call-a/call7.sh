SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call7.sh .gpu-run/kernel_probe.py .gpu-run/store_stages.py $OUT/
git log --oneline -1 > $OUT/tree.txt; git diff --stat >> $OUT/tree.txt
PYTHONPATH=$PWD timeout 60 python .gpu-run/store_stages.py $OUT > $OUT/store_stages.log 2>&1; echo "rc=$?" >> $OUT/store_stages.log
PYTHONPATH=$PWD timeout 170 python .gpu-run/kernel_probe.py $OUT > $OUT/kernel_probe.log 2>&1; echo "rc=$?" >> $OUT/kernel_probe.log
PYTHONPATH=$PWD timeout 330 python -X faulthandler -m pytest -v -p no:cacheprovider --durations=10 tests/test_persistence_crash.py tests/test_persistence_file_format.py tests/test_persistence_models.py tests/test_persistence_support.py tests/test_cuda_kernel_sources.py tests/test_block_cache.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; cat $OUT/store_stages.log | cut -c1-300; tail -3 $OUT/kernel_probe.log | cut -c1-300; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -25
