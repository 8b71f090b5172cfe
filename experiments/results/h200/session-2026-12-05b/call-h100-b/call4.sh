SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/plan_probe.py .gpu-run/call4.sh .gpu-run/ab_store.py $OUT/
T=tests/test_engine_robustness.py::test_an_engine_waits_for_the_blocks_another_engines_running_requests_reserved
PYTHONPATH=$PWD timeout 100 python .gpu-run/plan_probe.py $OUT > $OUT/probe.log 2>&1; echo "probe rc=$?" >> $OUT/probe.log
PYTHONPATH=$PWD/.gpu-run/head timeout 40 python .gpu-run/ab_store.py head $OUT/head.json >> $OUT/ab.log 2>&1
PYTHONPATH=$PWD timeout 40 python .gpu-run/ab_store.py new $OUT/new.json >> $OUT/ab.log 2>&1
PYTHONPATH=$PWD/.gpu-run/head timeout 60 python -m pytest -q -s -p no:cacheprovider $T > $OUT/abort_head.log 2>&1; echo "head rc=$?" >> $OUT/abort_head.log
PYTHONPATH=$PWD timeout 60 python -m pytest -q -s -p no:cacheprovider $T > $OUT/abort_new.log 2>&1; echo "new rc=$?" >> $OUT/abort_new.log
PYTHONPATH=$PWD timeout 60 python -m experiments.hot_path --out $OUT/hp --max-mib 100 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
PYTHONPATH=$PWD timeout 230 python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_robustness.py --deselect $T > $OUT/pytest.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest.log
cat $OUT/gpu.txt; grep -v "^ " $OUT/probe.log | cut -c1-1500; cut -c1-700 $OUT/ab.log; tail -3 $OUT/abort_head.log $OUT/abort_new.log | cut -c1-300; grep -A12 "store" $OUT/hp.log | head -30; grep -E "passed|failed|FAILED|ERROR|rc=" $OUT/pytest.log | tail -15
