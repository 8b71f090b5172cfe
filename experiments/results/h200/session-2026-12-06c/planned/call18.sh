SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h13; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree 5a1b45a (h13)"; python3 --version) > $OUT/gpu.txt
cd $N
PYTHONPATH=$N timeout 100 python -m experiments.hot_path --out $OUT/hp --max-mib 3200 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
grep -A8 "^| case" $OUT/hp.log | cut -c1-200; grep -A4 "^| context" $OUT/hp.log | tail -3; tail -1 $OUT/hp.log
PYTHONPATH=$N timeout 470 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=12 tests/test_pool_interrupts.py tests/test_engine_robustness.py tests/test_mlx_lm_adapter.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -15
