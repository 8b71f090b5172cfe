SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call6.sh $OUT/
PYTHONPATH=$PWD timeout 420 python -X faulthandler -m pytest -v -p no:cacheprovider --durations=15 tests/test_block_cache.py tests/test_pool.py tests/test_quantized_blocks.py tests/test_split_for_device.py tests/test_mlx_lm_adapter.py tests/test_cuda_kernel_sources.py tests/test_persistence.py tests/test_persistence_crash.py tests/test_persistence_file_format.py tests/test_persistence_models.py tests/test_persistence_support.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
PYTHONPATH=$PWD timeout 100 python -m experiments.hot_path --out $OUT/hp --max-mib 100 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
cat $OUT/gpu.txt; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal|what\(\)" $OUT/pytest.log | tail -25; tail -40 $OUT/hp.log | cut -c1-250
