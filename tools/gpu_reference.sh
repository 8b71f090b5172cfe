#!/usr/bin/env bash
# The GPU reference machine's history (benchmarks/results/ref-h200-cuda/): the whole default suite on
# the newest commits of main, measured on a CUDA host without a package index. docs/benchmarks.md,
# "Metal (Apple silicon) and CUDA", says how to call it through the device tool.
#
#   bash tools/gpu_reference.sh [RANGE] [JOBS] [SECONDS] [BENCH]   # default: HEAD~3..HEAD (3 commits), 8, 540, all
#
# Needs, in the checkout it runs in: .gpu/ (MLX with CUDA, mlx-lm and asv's wheels: .gpu/README.md) and
# .cache/gpu-reference/semantic.bundle (`git bundle create .cache/gpu-reference/semantic.bundle main`:
# the device's copy of the tree has no git history). Measures in a clone of the bundle under .asv/
# (kept while the machine stays warm), JOBS benchmarks at a time, one GPU each, and stops after SECONDS:
# a second call goes on where the first stopped (benchmarks with results are not run again). BENCH, a
# regex, measures only the benchmarks whose name it matches. The results so far are copied to
# $OUT/ref-h200-cuda/ after every call.
set -uo pipefail
RANGE=${1:-HEAD~3..HEAD}
JOBS=${2:-8}
SECONDS_LEFT=${3:-540}
BENCH=()
[ -n "${4:-}" ] && BENCH=(--bench "$4")
ROOT=$(pwd)
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
python3 -c 'import mlx.core' 2>/dev/null || {
    tar xJf .gpu/mlx-cuda13-sm90.tar.xz -C "$SITE" && tar xJf .gpu/mlx-lm.tar.xz -C "$SITE" || exit 1
}
python3 -c 'import asv' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl || exit 1
CLONE=$ROOT/.asv/gpu-reference-clone
[ -d "$CLONE/.git" ] || git clone -q -b main .cache/gpu-reference/semantic.bundle "$CLONE" || exit 1
cd "$CLONE" || exit 1
export PYTHONUNBUFFERED=1
# The committed H200 results were measured with this interpreter: its path names their environment.
timeout "$SECONDS_LEFT" python3 tools/bench_history.py --existing "$(command -v python3)" --machine ref-h200-cuda \
    --jobs "$JOBS" "${BENCH[@]}" "$RANGE" -- --launch-method spawn
status=$?
mkdir -p "${OUT:-$ROOT/.asv/gpu-reference-out}"
cp -r benchmarks/results/ref-h200-cuda benchmarks/results/benchmarks.json "${OUT:-$ROOT/.asv/gpu-reference-out}/"
[ $status -eq 124 ] && echo "stopped after ${SECONDS_LEFT} s: call again to go on"
exit $status
