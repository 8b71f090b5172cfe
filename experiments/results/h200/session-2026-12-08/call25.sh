SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
export R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader; cd $R/h1; export PYTHONPATH=$R/h1
timeout 90 python $R/s24/launch_ab.py 3 2>&1 | grep -v OpenBLAS | tail -5; echo "ab t=$SECONDS"
timeout ${T:-200} python -X faulthandler -m pytest -q -p no:cacheprovider --tb=short tests/test_nvrtc.py tests/test_engine.py tests/test_quantized_blocks.py > $OUT/p.log 2>&1; echo "tests rc=$? t=$SECONDS"; grep -E "^E |FAILED|ERROR|Warn|warn" $OUT/p.log | head -20 | cut -c1-300; tail -2 $OUT/p.log
