SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h10; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree e0aed4d (h10)") > $OUT/gpu.txt
cd $N
PYTHONPATH=$N timeout 200 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=5 tests/test_pool_interrupts.py tests/test_engine_robustness.py tests/test_mlx_lm_adapter.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -12
