mkdir -p /tmp/pyspy && (cd /tmp/pyspy && python3 -m zipfile -e $OLDPWD/.gpu/py_spy-*.whl . ) && PS=/tmp/pyspy/py_spy-0.4.3.data/scripts/py-spy && chmod +x $PS
N=$PWD/.gpu-run/h15; cd $N
(time PYTHONPATH=$N timeout 60 python probe/store_profile.py store 4 24 2) 2>&1 | tail -4
for w in "store 4 24" "copy 4 24"; do
  set -- $w; f=$OUT/prof_$1_$2x$3
  PYTHONPATH=$N timeout 100 $PS record --native --gil --rate 200 --format raw -o $f.txt -- python probe/store_profile.py $1 $2 $3 6 > $f.log 2>&1
  echo "rc=$?"; grep -v behind $f.log | tail -2; grep -c behind $f.log
  python probe/summarize_profile.py $f.txt 70 > $f.summary 2>&1; head -30 $f.summary
done
