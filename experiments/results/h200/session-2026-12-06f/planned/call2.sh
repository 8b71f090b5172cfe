SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
cd $R/h3; PYTHONPATH=$R/h3 timeout 190 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_pool.py tests/test_engine_robustness.py -x > $OUT/pytest_h3.log 2>&1; echo "pytest h3 rc=$? t=$SECONDS"; tail -4 $OUT/pytest_h3.log | cut -c1-400
