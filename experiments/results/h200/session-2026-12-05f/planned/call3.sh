SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; H=$R/h; (nvidia-smi --query-gpu=name --format=csv,noheader; echo tree 94ac696) > $OUT/gpu.txt
cd $H && PYTHONPATH=$H timeout 230 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda_kernel_sources.py tests/test_pool.py tests/test_block_cache.py tests/test_engine_robustness.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -12
for t in head new head new; do
  if [ $t = head ]; then P=$R/t; else P=$H; fi
  echo "== $t" >> $OUT/stages.log; PYTHONPATH=$P timeout 30 python $R/store_stages.py /dev/null 2>&1 | grep layers >> $OUT/stages.log
done
cut -c1-230 $OUT/stages.log
PYTHONPATH=$H timeout 50 python -m experiments.hot_path --out /tmp/hp --max-mib 100 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
grep -A7 "^| case" $OUT/hp.log; tail -2 $OUT/hp.log
timeout 40 python $R/launch_probe.py /tmp > $OUT/launch_probe.log 2>&1; echo "rc=$?" >> $OUT/launch_probe.log
grep -v "^semantic" $OUT/launch_probe.log | cut -c1-200
PYTHONPATH=$H timeout 60 python $R/slow_sync.py /tmp/ss.json > $OUT/slow_sync.log 2>&1; echo "rc=$?" >> $OUT/slow_sync.log
cut -c1-400 $OUT/slow_sync.log
