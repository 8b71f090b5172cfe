J=$R/s23/jit_probe.py
for m in mlx mlx nvrtc nvrtc nvrtc_bf16; do timeout 60 python $J $m 2>&1 | tail -3; done
ls /tmp/mlx/*/ptx | head -30; ls /tmp/mlx/*/ptx | wc -l
C=$R/s23/cold_start.py
for a in "smollm2-135m 30 4 dense" "smollm2-135m 30 4 dense" "smollm2-135m 30 4 q4" "smollm2-135m 30 4 q8" "gemma3-12b-full 48 4 dense"; do PYTHONPATH=$PWD timeout 90 python $C $a 2>&1 | tail -2; done
