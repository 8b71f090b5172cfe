SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
export PYTHONPATH=$PWD
git rev-parse --short HEAD > $OUT/sha.txt 2>/dev/null || echo 225e47c > $OUT/sha.txt
nvidia-smi > $OUT/nvidia-smi.txt 2>&1
timeout 330 python -m experiments.exp_006_benchmark --device gpu --git-commit 225e47c --output-dir $OUT/exp006 > $OUT/exp006.log 2>&1; echo "exp006 rc=$?" >> $OUT/exp006.log
timeout 230 python -m pytest -q -p no:cacheprovider tests/test_quantized_blocks.py tests/test_split_for_device.py tests/test_exp006.py tests/test_local_models.py > $OUT/pytest_1.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_1.log
tail -3 $OUT/exp006.log; tail -3 $OUT/pytest_1.log
