SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt; cd $R/h1; nproc
for i in 1 2; do /usr/bin/time -f "child start %e s" python -c "import mlx.core as mx; mx.eval(mx.zeros(1)); import semantic.persistence" ; done 2>&1 | tail -2
PYTHONPATH=$R/h1 timeout 150 python rebuild_apart.py $OUT/apart.json 3 100 > $OUT/apart.log 2>&1; echo "apart rc=$? t=$SECONDS"; cut -c1-1500 $OUT/apart.log
T=$(python3 -c "
import json,statistics as s;r=json.load(open('$OUT/apart.json'))['rounds']
q=[x[c]['rebuild_apart'][0]/x[c]['rebuild'][0] for x in r for c in ('4x24','8x30','16x30','32x48')]
print('h2' if s.mean(q)<1 else 'h1')" 2>/dev/null || echo h1); echo "tree $T"
cd $R/h2; PYTHONPATH=$R/h2 timeout 120 python -X faulthandler -m pytest -q -p no:cacheprovider --tb=short tests/test_block_cache.py > $OUT/p_bc.log 2>&1; echo "block_cache(h2) rc=$? t=$SECONDS"; grep -E "^E |FAILED|ERROR" $OUT/p_bc.log | head -10 | cut -c1-250; tail -1 $OUT/p_bc.log
cd $R/h1; PYTHONPATH=$R/h1 timeout 200 python -X faulthandler -m pytest -v -s -p no:cacheprovider --tb=short --durations=0 tests/test_persistence_crash.py > $OUT/p_crash.log 2>&1; echo "crash rc=$? t=$SECONDS"; grep -E "^E |FAILED|ERROR|passed|failed|s call|\{" $OUT/p_crash.log | head -40 | cut -c1-250
cd $R/$T; L=$((${N:-590} - SECONDS - 45)); PYTHONPATH=$R/$T timeout $L python -m experiments.hot_path --out $OUT/hp --max-mib 3200 --resume-tokens 1024,4096,8192 --resume-repeat 12 --conversation-turns 2 > $OUT/hp.log 2>&1; echo "hp($T) rc=$? t=$SECONDS"; grep -v '"profile"' $OUT/hp.log | tail -30 | cut -c1-400
L=$((${N:-590} - SECONDS)); [ $L -gt 15 ] && { PYTHONPATH=$R/$T timeout $L python $R/s19/q4_over_dense.py $OUT/q4_over_dense.json 4 40 > $OUT/q4.log 2>&1; echo "q4($T) rc=$? t=$SECONDS"; tail -5 $OUT/q4.log | cut -c1-300; }
mv $OUT/hp/hot_path.json $OUT/ 2>/dev/null; mv $OUT/hp/hot_path_profile.txt $OUT/ 2>/dev/null; rm -rf $OUT/hp
