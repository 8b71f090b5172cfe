SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$PWD/.gpu-run; N=$R/h6; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree $(cat $R/h6.rev)") > $OUT/gpu.txt
cd $N && PYTHONPATH=$N timeout $1 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_engine_robustness.py > $OUT/pytest_robustness.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_robustness.log
PYTHONPATH=$N timeout $2 python -X faulthandler -m pytest -q -p no:cacheprovider tests/test_block_cache.py -k "store or reuse or shar or window" > $OUT/pytest_block_cache.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_block_cache.log
for f in $OUT/pytest_*.log; do echo "== $f"; grep -E "passed|failed|FAILED|ERROR|rc=|Fatal" $f | tail -8; done
