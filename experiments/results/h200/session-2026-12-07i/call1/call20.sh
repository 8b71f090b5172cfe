SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt; nproc; cd $R/h1
timeout 240 bash $R/s23/crash_probe.sh > $OUT/probe.log 2>&1; echo "probe rc=$? t=$SECONDS"; grep -v "OpenBLAS" $OUT/probe.log | cut -c1-400 | head -80
PYTHONPATH=$R/h1 timeout 150 python -m experiments.hot_path --out $OUT/hp --max-mib 3200 --resume-tokens 1024,4096,8192 --resume-repeat 12 --conversation-turns 2 > $OUT/hp.log 2>&1; echo "hp rc=$? t=$SECONDS"; grep -v '"profile"' $OUT/hp.log | tail -14 | cut -c1-400
PYTHONPATH=$R/h1 timeout 100 python $R/s19/q4_over_dense.py $OUT/q4.json 4 40 > $OUT/q4.log 2>&1; echo "q4 rc=$? t=$SECONDS"; tail -5 $OUT/q4.log | cut -c1-300
mv $OUT/hp/hot_path.json $OUT/ 2>/dev/null; mv $OUT/hp/hot_path_profile.txt $OUT/ 2>/dev/null; rm -rf $OUT/hp
