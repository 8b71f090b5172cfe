SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
R=$OUT; nvidia-smi --query-gpu=name --format=csv,noheader > $R/gpu.txt
OUT=/tmp/gref bash tools/gpu_reference.sh 'HEAD^!' 1 470 '^bench_(reconstruct\.Reconstruct|extract\.Extract|quantized\.QuantizedRebuild|roundtrip\.RoundTrip)\.' > $R/asv.log 2>&1; echo "rc=$?" >> $R/asv.log
tail -25 $R/asv.log | cut -c1-250
H8=$(git -C .asv/gpu-reference-clone rev-parse HEAD | cut -c1-8); cp /tmp/gref/ref-h200-cuda/$H8-*.json /tmp/gref/benchmarks.json $R/; ls -la $R
