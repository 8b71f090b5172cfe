SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
git log --oneline -1 > $OUT/commit.txt
cp .gpu-run/stages.py .gpu-run/call1.sh $OUT/
timeout 170 python .gpu-run/stages.py $OUT > $OUT/stages.log 2>&1; echo "stages rc=$?" >> $OUT/stages.log
timeout 80 python -m experiments.hot_path --out $OUT/hp --max-mib 100 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
timeout 290 python -m pytest -q -p no:cacheprovider tests/test_block_cache.py tests/test_pool.py tests/test_engine.py tests/test_quantized_blocks.py > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; cat $OUT/stages.log; tail -30 $OUT/hp.log; grep -E "passed|failed|FAILED|ERROR|rc=" $OUT/pytest.log | tail -15
