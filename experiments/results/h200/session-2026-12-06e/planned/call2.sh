SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
cd $R/h2
PYTHONPATH=$R/h2 timeout 150 python -m experiments.gpu_kernel_choices --parts dequantize --repeat 30 --output $OUT/choices.json > $OUT/choices.log 2>&1; echo "choices rc=$?"; grep -v OpenBLAS $OUT/choices.log | tail -14
PYTHONPATH=$R/h2 timeout 100 python $R/q4_parts.py $OUT > $OUT/q4_parts.log 2>&1; echo "q4_parts rc=$?"; grep '^{' $OUT/q4_parts.log
ls /tmp/mlx/*/ptx 2>/dev/null | grep -c semantic; ls /tmp/mlx/*/ptx 2>/dev/null | grep semantic_dequantize | head -3
PYTHONPATH=$R/h2 timeout 180 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_quantized_blocks.py > $OUT/pytest_quantized.log 2>&1; echo "pytest quantized rc=$?"; tail -3 $OUT/pytest_quantized.log
PYTHONPATH=$R/h2 timeout 150 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_block_cache.py tests/test_pool.py > $OUT/pytest_cache_pool.log 2>&1; echo "pytest cache+pool rc=$?"; tail -3 $OUT/pytest_cache_pool.log
