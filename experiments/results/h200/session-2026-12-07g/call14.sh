SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt; cd $R/h1
PYTHONPATH=$R/h1 timeout 170 python -X faulthandler -m pytest -v -p no:cacheprovider --tb=short --durations=10 tests/test_engine_robustness.py -k "interrupt_at_any_point_of_a_run" > $OUT/p_rob4.log 2>&1; echo "rob4 rc=$? t=$SECONDS"; grep -E "^E |FAILED|ERROR|passed|failed|PASSED" $OUT/p_rob4.log | head -30 | cut -c1-300
PYTHONPATH=$R/h1 timeout 160 python -m experiments.hot_path --out $OUT/hp --max-mib 3200 --resume-tokens 1024,4096,8192 --resume-repeat 12 --conversation-turns 2 > $OUT/hp.log 2>&1; echo "hp rc=$? t=$SECONDS"; tail -40 $OUT/hp.log | cut -c1-250
L=$((${N:-590} - SECONDS)); [ $L -gt 40 ] && { PYTHONPATH=$R/h1 timeout $((L<90?L:90)) python $R/s19/q4_over_dense.py $OUT/q4_over_dense.json 4 40 > $OUT/q4.log 2>&1; echo "q4 rc=$? t=$SECONDS"; tail -6 $OUT/q4.log | cut -c1-250; }
for f in test_cuda_kernel_sources test_split_for_device test_persistence_support test_pool_interrupts test_persistence_interrupts; do
  L=$((${N:-590} - SECONDS)); [ $L -lt 15 ] && { echo "skip $f"; continue; }
  PYTHONPATH=$R/h1 timeout $L python -X faulthandler -m pytest -v -p no:cacheprovider --tb=short tests/$f.py > $OUT/p_$f.log 2>&1; echo "$f rc=$? t=$SECONDS"; grep -E "^E |FAILED|ERROR" $OUT/p_$f.log | head -10 | cut -c1-300; tail -1 $OUT/p_$f.log | cut -c1-300
done
