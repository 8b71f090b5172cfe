SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
R=$PWD/.gpu-run; cd $R/h1
PYTHONPATH=$R/h1 timeout 150 python experiments/results/h200/session-2026-12-07g/planned/rebuild_stages.py $OUT/stages.json 3 100 > $OUT/stages.log 2>&1; echo "stages rc=$? t=$SECONDS"; cat $OUT/stages.log | cut -c1-3000
cd $R/.. && N=${N:-540} bash .gpu-run/call16.sh
