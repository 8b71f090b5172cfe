SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
for t in h3 h4; do cd $R/$t; PYTHONPATH=$R/$t timeout 80 python $R/rebuild_layers.py $OUT > $OUT/rebuild_layers_$t.log 2>&1; echo "$t rc=$?"; mv $OUT/rebuild_layers.json $OUT/rebuild_layers_$t.json; grep '^{' $OUT/rebuild_layers_$t.log; done
echo "TMPDIR=${TMPDIR:-unset} MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-unset}"; ls -d /tmp/mlx* 2>&1 | head -3
find / -xdev \( -name "*custom_kernel_semantic*" -o -name "*.ptx" \) 2>/dev/null | head -8 | tee $OUT/ptx_cache.txt
cd $R/h4; PYTHONPATH=$R/h4 timeout 200 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_block_cache.py tests/test_quantized_blocks.py -k "not dequantizing_gather_equals" > $OUT/pytest_h4.log 2>&1; echo "pytest h4 rc=$?"; tail -3 $OUT/pytest_h4.log
