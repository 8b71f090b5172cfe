# Where a crash-test trial's time goes on the GPU host. Run from the tree root with PYTHONPATH set.
C=$R/s23/child.py; D=$(mktemp -d); export PYTHONPATH=$PWD:$PWD/tests
echo "HOME=$HOME"; env | grep -i cuda; ls -la ~/.nv 2>&1 | head; du -sh /tmp/mlx 2>&1
run1() { timeout 60 python $C $D/$1 $(date +%s.%N); }
mkdir -p $D/a $D/b $D/c; echo "alone 1: $(run1 a)"; echo "alone 2: $(run1 b)"
PROBE_PROFILE=1 timeout 60 python $C $D/c $(date +%s.%N) 2>&1 | tail -30
for i in 1 2 3 4 5 6 7 8; do mkdir -p $D/p$i; (echo "par $i: $(run1 p$i)") & done; wait
echo "--- fresh CUDA_CACHE_PATH"; mkdir -p $D/e $D/f; export CUDA_CACHE_PATH=$D/cc; echo "cc 1: $(run1 e)"; echo "cc 2: $(run1 f)"; du -sh $D/cc; unset CUDA_CACHE_PATH
echo "--- kill teardown"; for i in 1 2 3; do mkdir -p $D/k$i; python - $C $D/k$i <<'PY'
import subprocess, sys, time, os, signal
p = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2], str(time.time())], stdout=subprocess.PIPE, env={**os.environ, "PROBE_WAIT": "1"})
line = p.stdout.readline(); p.stdout.readline()
t = time.time(); p.kill(); p.wait(); print("kill->wait %.3f s" % (time.time() - t), line.decode().strip())
PY
done
echo "--- CUDA_VISIBLE_DEVICES empty"; CUDA_VISIBLE_DEVICES= timeout 60 python -c "import mlx.core as mx, time; t=time.time(); print(mx.default_device(), mx.cuda.is_available()); print(mx.eval(mx.ones(3)+1), time.time()-t)" 2>&1 | tail -3
mkdir -p $D/g; echo "nogpu child: $(CUDA_VISIBLE_DEVICES= timeout 60 python $C $D/g $(date +%s.%N) 2>&1 | tail -2)"
rm -rf $D
