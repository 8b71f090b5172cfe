SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h7; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree 4761aab (h7)") > $OUT/gpu.txt
cd $N
PYTHONPATH=$N timeout 150 python -m experiments.hot_path --out $OUT/hp --max-mib 3200 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
grep -A8 "^| case" $OUT/hp.log; tail -2 $OUT/hp.log
PYTHONPATH=$N timeout 400 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=8 tests/test_cuda_kernel_sources.py tests/test_pool.py tests/test_block_cache.py tests/test_engine_robustness.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -12
