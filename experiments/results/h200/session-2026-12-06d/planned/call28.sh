SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
for t in h16 h15 h16; do cd $R/$t; echo "== $t"; PYTHONPATH=$R/$t timeout 70 python probe/q4_vs_dense.py $OUT/q4_vs_dense_$t.json 2>&1 | grep -v OpenBLAS | tail -3; done
cd $R/h16; PYTHONPATH=$R/h16 timeout 100 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_quantized_blocks.py -k "bit_for_bit or exactly or dequantized_cache or quantized_once or batch_together" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest.log
PYTHONPATH=$R/h16 timeout 60 python -m experiments.gpu_kernel_choices --parts dequantize --repeat 20 --output $OUT/choices.json > $OUT/choices.log 2>&1; echo "choices rc=$?"; grep -v OpenBLAS $OUT/choices.log | tail -13
