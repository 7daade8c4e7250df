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
#                                         bf16, FLUX.2 [klein] 4B's in bf16, as a Q8_0 GGUF file, with two workers on the card, in
#                                         fp8, as Q4_0, and T5 on one 512-token prompt: most wanted
#                                         first), writing their JSON and a log to OUT. Every step has
#                                         its own time limit and the whole run a deadline
#                                         (GPU_CHECK_SECONDS, default 520): a step that runs out is
#                                         reported and the next one starts; one that would end past the
#                                         deadline gets what is left, or is skipped and named.
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

DEADLINE=${GPU_CHECK_SECONDS:-520}

step() {  # step SECONDS NAME COMMAND...: one part of the check, with its own limit, within the deadline
  local limit=$1 name=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: SKIPPED, ${left} s left of the ${DEADLINE} s deadline"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
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
  local big=(--height 1024 --width 1024 --steps 3) files=outputs/models/flux-dev-random-files
  step 75 "tests that need CUDA" "$py" -m pytest -p no:cacheprovider -q tests/test_offload.py tests/test_precision.py -k "host_streamer or gpu or upcast or fp8"
  step 60 "flux-dev-random: build the transformer (22 GiB, random bf16)" "$py" -m helpers model flux-dev-random
  step 120 "bf16 transformer at 1024x1024" "$py" "${b[@]}" "${big[@]}" \
    --strategies resident accelerate stream --json "$out/flux-dev-random-1024-bf16.json" --overwrite
  step 60 "flux2-klein-4b-random: build the transformer (7.2 GiB, random bf16)" "$py" -m helpers model flux2-klein-4b-random
  step 90 "FLUX.2 [klein] 4B transformer at 1024x1024" "$py" -m helpers bench --model flux2-klein-4b-random \
    --max-memory "$budget" "${big[@]}" --strategies resident accelerate stream \
    --json "$out/flux2-klein-4b-random-1024-bf16.json" --overwrite
  mkdir -p "$files"
  step 60 "Q8_0 GGUF file of the transformer (quantized on the GPU)" "$py" -m helpers convert --model flux-dev-random \
    --weights q8_0 --out "$files/transformer-q8_0.gguf"
  step 90 "Q8_0 GGUF transformer at 1024x1024" "$py" "${b[@]}" "${big[@]}" --transformer "$files/transformer-q8_0.gguf" \
    --strategies accelerate stream diffusers-resident --json "$out/flux-dev-random-1024-q8_0.json" --overwrite
  step 60 "two workers on one card (tiny, 8 prompts at 256x256)" bash scripts/gpu-check.sh workers "$out"
  step 60 "fp8 copy of the transformer" "$py" -m helpers convert --model flux-dev-random --weights fp8 \
    --out outputs/models/flux-dev-random-fp8
  step 80 "fp8 transformer at 1024x1024" "$py" -m helpers bench --model outputs/models/flux-dev-random-fp8 \
    --max-memory "$budget" "${big[@]}" --strategies accelerate stream \
    --json "$out/flux-dev-random-1024-fp8.json" --overwrite
  step 45 "Q4_0 GGUF file of the transformer" "$py" -m helpers convert --model flux-dev-random \
    --weights q4_0 --out "$files/transformer-q4_0.gguf"
  step 70 "Q4_0 GGUF transformer at 1024x1024" "$py" "${b[@]}" "${big[@]}" --transformer "$files/transformer-q4_0.gguf" \
    --strategies accelerate stream --json "$out/flux-dev-random-1024-q4_0.json" --overwrite
  step 60 "T5 on one 512-token prompt" "$py" "${b[@]}" --stage text_encoding --steps 3 \
    --strategies resident accelerate stream --json "$out/flux-dev-random-t5.json" --overwrite
  ls -la "$out"
}

workers() {  # the tiny twin's 8 prompts made by 1 worker, then by 2 sharing GPU 0: wall times, same images?
  local out=${1:?} py=${PYTHON:-python3} dir=outputs/gpu-workers budget=${WORKERS_BUDGET:-0=4GiB,cpu=8GiB}
  local size=(--height 256 --width 256 --steps 8 --max-memory "$budget")
  rm -rf "$dir" && mkdir -p "$dir"
  local prompts=() c s
  for c in red green blue yellow; do for s in circle square; do prompts+=("--prompt=a $c $s"); done; done
  "$py" -m helpers encode --model tiny "${prompts[@]}" --out "$dir/eight.safetensors" --max-memory "$budget" || return 1
  local t0=$SECONDS
  "$py" -m helpers diffuse --embeddings "$dir/eight.safetensors" --out "$dir/one/img.png" "${size[@]}" || return 1
  local t1=$SECONDS
  "$py" -m helpers diffuse --embeddings "$dir/eight.safetensors" --out "$dir/two/img.png" "${size[@]}" --workers 2 || return 1
  local t2=$SECONDS
  "$py" - "$dir" "$((t1 - t0))" "$((t2 - t1))" "$out/gpu-workers.json" <<'PY'
import json, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

folder, one, two, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
same = [np.array_equal(np.asarray(Image.open(folder / "one" / f"img-{i}.png")),
                       np.asarray(Image.open(folder / "two" / f"img-{i}.png"))) for i in range(1, 9)]
result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "model": "tiny", "prompts": 8, "size": "256x256", "steps": 8,
          "wall_s_1_worker": one, "wall_s_2_workers": two, "images_equal": sum(same)}
out.write_text(json.dumps(result, indent=1))
print(result)
PY
}

case "${1:-}" in
  prepare) prepare ;;
  workers) shift; workers "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/gpu-check.sh prepare | run OUT | workers OUT" >&2; exit 2 ;;
esac
