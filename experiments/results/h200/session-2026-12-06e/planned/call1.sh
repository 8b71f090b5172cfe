SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
cd $R/h1; PYTHONPATH=$R/h1 timeout 150 python $R/q4_parts.py $OUT > $OUT/q4_parts.log 2>&1; echo "q4_parts rc=$?"; grep -v OpenBLAS $OUT/q4_parts.log | head -5
PYTHONPATH=$R/h1 timeout 330 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_quantized_blocks.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -5 $OUT/pytest.log
