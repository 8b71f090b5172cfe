SP=$(python3 -c "import site;print(site.getsitepackages()[0])"); python3 -c "import mlx" 2>/dev/null || { tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP; }
N=$PWD/.gpu-run/h15; cd $N; nvidia-smi --query-gpu=name,clocks.mem,clocks.max.mem --format=csv,noheader > $OUT/gpu.txt; cat $OUT/gpu.txt
PYTHONPATH=$N timeout 200 python -m experiments.gpu_kernel_choices --parts dequantize --repeat 20 --output $OUT/choices.json > $OUT/choices.log 2>&1; echo "rc=$?"
grep -v OpenBLAS $OUT/choices.log | tail -14; python3 -c "import json;d=json.load(open('$OUT/choices.json'));print({k:v for k,v in d['dequantize'].items() if k in ('dense_rebuild','dense_gather_kernel','device_copy','q4_rebuild')})"
PYTHONPATH=$N timeout 150 python probe/q4_vs_dense.py $OUT/q4_vs_dense.json 2>&1 | grep -v OpenBLAS | tail -3
