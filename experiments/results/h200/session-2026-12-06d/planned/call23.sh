SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
mkdir -p /tmp/pyspy && (cd /tmp/pyspy && python3 -m zipfile -e $OLDPWD/.gpu/py_spy-*.whl . ) && PS=/tmp/pyspy/py_spy-0.4.3.data/scripts/py-spy && chmod +x $PS
N=$PWD/.gpu-run/h15; cd $N; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
PYTHONPATH=$N timeout 100 python probe/launch_parts.py 4 24 $OUT/launch_4x24.json 2>&1 | tail -6
PYTHONPATH=$N timeout 100 python probe/launch_parts.py 16 30 $OUT/launch_16x30.json 2>&1 | tail -6
for w in "store 4 24" "copy 4 24"; do
  set -- $w; f=$OUT/attach_$1_$2x$3
  PYTHONPATH=$N python probe/store_profile.py $1 $2 $3 14 > $f.log 2>&1 & P=$!
  for i in $(seq 200); do grep -q ready $f.log && break; kill -0 $P 2>/dev/null || break; sleep 0.5; done
  timeout 60 $PS record --pid $P --native --idle --rate 100 --duration 6 --format raw -o $f.txt > $f.pyspy 2>&1; echo "pyspy rc=$?"
  wait $P; cat $f.log | grep -v OpenBLAS
  python probe/summarize_profile.py $f.txt 80 > $f.summary 2>&1; head -45 $f.summary; gzip $f.txt
done
