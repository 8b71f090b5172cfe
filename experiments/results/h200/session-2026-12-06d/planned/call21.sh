SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
mkdir -p /tmp/pyspy && (cd /tmp/pyspy && python3 -m zipfile -e $OLDPWD/.gpu/py_spy-*.whl . ) && PS=/tmp/pyspy/py_spy-0.4.3.data/scripts/py-spy && chmod +x $PS
R=$PWD/.gpu-run; N=$R/h15; (nvidia-smi --query-gpu=name --format=csv,noheader; echo "tree d114ac5 (h15)"; python3 --version; nproc) > $OUT/gpu.txt
cd $N
PYTHONPATH=$N timeout 60 python -m experiments.hot_path --out $OUT/hp --max-mib 100 --resume-tokens 1024 --resume-repeat 4 --conversation-turns 2 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log
grep -A6 "^| case" $OUT/hp.log | cut -c1-200
for w in "store 4 24" "copy 4 24" "store 16 30" "rebuild 4 24"; do
  set -- $w; f=$OUT/prof_$1_$2x$3
  PYTHONPATH=$N timeout 80 $PS record --native --idle --rate 250 --format raw -o $f.txt -- python probe/store_profile.py $1 $2 $3 8 > $f.log 2>&1
  grep -v behind $f.log | tail -3
  python probe/summarize_profile.py $f.txt 70 > $f.summary 2>&1; head -40 $f.summary
done
