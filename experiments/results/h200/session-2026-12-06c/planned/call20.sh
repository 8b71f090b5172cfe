SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h14; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree 72388c7 (h14)"; python3 --version) > $OUT/gpu.txt
cd $N
PYTHONPATH=$N timeout 300 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=6 tests/test_engine_robustness.py tests/test_persistence_interrupts.py -k "closed or put_then_close or device_work_lock or in_no_queue or thread" > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -15
