SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
H=$PWD/.gpu-run/h3; (nvidia-smi --query-gpu=name --format=csv,noheader; echo tree 9d9db39) > $OUT/gpu.txt
cd $H && PYTHONPATH=$H timeout 380 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=5 tests/test_engine_robustness.py tests/test_persistence.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -15
