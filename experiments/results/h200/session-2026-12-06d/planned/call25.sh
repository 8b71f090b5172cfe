SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
N=$PWD/.gpu-run/h15; cd $N; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
PYTHONPATH=$N timeout 200 python probe/q4_vs_dense.py $OUT/q4_vs_dense.json 2>&1 | grep -v OpenBLAS | tail -5
