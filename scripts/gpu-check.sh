#!/usr/bin/env bash
# The GPU check, in two halves that share this file.
#
#   bash scripts/gpu-check.sh prepare     on a machine with the project installed (make install):
#                                         downloads as wheels, into .gpu/wheels/, the packages a bare
#                                         GPU machine with torch preinstalled lacks (the versions of
#                                         .venv, so both run the same code)
#   bash scripts/gpu-check.sh run OUT     on the GPU machine, from the repository root, with .gpu/
#                                         carried along: installs those wheels without an index, runs
#                                         the tests that need CUDA, then the full-size benchmarks
#                                         (FLUX.1-dev's transformer with random weights at 1024x1024 in
#                                         bf16 and fp8, and T5 on one 512-token prompt), writing their
#                                         JSON and a log to OUT. Every step has its own time limit, so
#                                         the whole run ends by itself within 9 minutes; a step that
#                                         runs out is reported and the next one starts.
#
# `make bench-gpu` runs the second half on a GPU machine that has the packages already. On a lent
# machine whose image has torch but not diffusers: prepare here, carry .gpu/ along, and run
# `bash scripts/gpu-check.sh run "$OUT"` there with a limit of about 560 s.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=.gpu/wheels
# what the GPU machine's image lacks (diffusers) or holds in another version; pure Python, so one wheel
# serves its Python (3.12 there) as well as ours. Its torch, numpy, safetensors, tokenizers and the rest
# are used as they are.
PACKAGES="diffusers transformers accelerate huggingface_hub"

prepare() {
  local pins=()
  for p in $PACKAGES; do
    pin=$(.venv/bin/python -m pip freeze 2>/dev/null | grep -i -E "^${p//-/[-_]}==" | head -1)
    pins+=("${pin:-$p}")
  done
  mkdir -p "$WHEELS"
  rm -rf "$WHEELS"
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "${pins[@]}"
  du -sh "$WHEELS"
}

step() {  # step SECONDS NAME COMMAND...: one part of the check, with its own limit
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start)) s"
  return 0
}

run() {
  local out=${1:?give the folder for the results}
  mkdir -p "$out"
  exec > >(tee "$out/gpu-check.log") 2>&1
  export PYTHONUNBUFFERED=1
  local py=${PYTHON:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if [ -d "$WHEELS" ]; then
    "$py" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" $PACKAGES || exit 1
  fi
  "$py" -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
  local budget="0=8.5GiB,cpu=30GiB" b=(-m helpers bench --model flux-dev-random --max-memory "0=8.5GiB,cpu=30GiB")
  step 90 "tests that need CUDA" "$py" -m pytest -p no:cacheprovider -q tests/test_offload.py tests/test_precision.py -k "host_streamer or gpu or upcast or fp8"
  step 60 "flux-dev-random: build the transformer (22 GiB, random bf16)" "$py" -m helpers model flux-dev-random
  step 150 "bf16 transformer at 1024x1024" "$py" "${b[@]}" --height 1024 --width 1024 --steps 3 \
    --strategies resident accelerate stream --json "$out/flux-dev-random-1024-bf16.json" --overwrite
  step 90 "fp8 copy of the transformer" "$py" -m helpers convert --model flux-dev-random --weights fp8 \
    --out outputs/models/flux-dev-random-fp8
  step 120 "fp8 transformer at 1024x1024" "$py" -m helpers bench --model outputs/models/flux-dev-random-fp8 \
    --max-memory "$budget" --height 1024 --width 1024 --steps 3 --strategies accelerate stream \
    --json "$out/flux-dev-random-1024-fp8.json" --overwrite
  step 90 "T5 on one 512-token prompt" "$py" "${b[@]}" --stage text_encoding --steps 3 \
    --strategies resident accelerate stream --json "$out/flux-dev-random-t5.json" --overwrite
  ls -la "$out"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/gpu-check.sh prepare | run OUT" >&2; exit 2 ;;
esac
