SP=$(python3 -c 'import site;print(site.getsitepackages()[0])'); tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C $SP && tar xJf .gpu/mlx-lm.tar.xz -C $SP
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
cp .gpu-run/call2.sh .gpu-run/launch_probe.py .gpu-run/store_stages.py .gpu-run/churned_store.py $OUT/
R=$PWD/.gpu-run
for r in 1 2; do
  PYTHONPATH=$R/head timeout 40 python $R/store_stages.py $OUT/stages_head_$r.json > $OUT/stages_head_$r.log 2>&1
  PYTHONPATH=$R/t timeout 40 python $R/store_stages.py $OUT/stages_new_$r.json > $OUT/stages_new_$r.log 2>&1
done
PYTHONPATH=$R/head timeout 60 python $R/churned_store.py $OUT/churned_head.json > $OUT/churned_head.log 2>&1
PYTHONPATH=$R/t timeout 60 python $R/churned_store.py $OUT/churned_new.json > $OUT/churned_new.log 2>&1
timeout 40 python $R/launch_probe.py $OUT > $OUT/launch_probe.log 2>&1; echo "rc=$?" >> $OUT/launch_probe.log
(cd $R/t && PYTHONPATH=$R/t timeout 150 python -m experiments.hot_path --out $OUT/hp --max-mib 4000 --resume-tokens 1024,4096 --resume-repeat 6 --conversation-turns 4 > $OUT/hp.log 2>&1; echo "hp rc=$?" >> $OUT/hp.log)
cat $OUT/gpu.txt; for f in $OUT/stages_*.log $OUT/churned_*.log; do echo "== $f"; tail -6 $f | cut -c1-220; done; tail -4 $OUT/launch_probe.log | cut -c1-200; grep -E '"case"|ratio' $OUT/hp.log | cut -c1-160 | tail -20; tail -3 $OUT/hp.log
