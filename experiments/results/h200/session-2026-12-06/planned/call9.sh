SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h5; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "old tree d2b4ee8 (h4), new tree bc60055 (h5)") > $OUT/gpu.txt
cd $N && PYTHONPATH=$N timeout 240 python -X faulthandler -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda_kernel_sources.py tests/test_pool.py tests/test_block_cache.py tests/test_engine_robustness.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $OUT/pytest.log | tail -12
for t in old new old new old new; do
  if [ $t = old ]; then P=$R/h4; else P=$N; fi
  echo "== $t" >> $OUT/stages.log; PYTHONPATH=$P timeout 30 python $R/store_stages.py /dev/null 2>&1 | grep layers >> $OUT/stages.log
done
cut -c1-230 $OUT/stages.log
PYTHONPATH=$N timeout 60 python -m experiments.hot_path --out /tmp/hp --max-mib 100 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
grep -A7 "^| case" $OUT/hp.log; tail -2 $OUT/hp.log
