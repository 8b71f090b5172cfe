SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
N=$PWD/.gpu-run/h15; cd $N; nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
PYTHONPATH=$N timeout 120 python probe/launch_parts.py 4 24 $OUT/launch_4x24.json 2>&1 | grep -v OpenBLAS | tail -9
PYTHONPATH=$N timeout 120 python probe/launch_parts.py 16 30 $OUT/launch_16x30.json 2>&1 | grep -v OpenBLAS | tail -9
