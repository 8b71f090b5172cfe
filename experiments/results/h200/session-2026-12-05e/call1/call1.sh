SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call1.sh $OUT/
cd .gpu-run/t
PYTHONPATH=$PWD timeout 540 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_cuda_kernel_sources.py tests/test_block_cache.py tests/test_pool.py tests/test_engine_robustness.py \
  tests/test_engine.py tests/test_mlx_lm_adapter.py tests/test_quantized_blocks.py tests/test_persistence.py \
  tests/test_persistence_models.py tests/test_persistence_support.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal|Timeout" $OUT/pytest.log | tail -25
