#!/usr/bin/env bash
# One device call: correctness on the GPU (issue 10 item 7), ours against the reference on
# the same GPU, same S1-mini-shape random checkpoint, same prompts: (a) greedy float32
# frames equal (our eager and compiled runners), (b) bf16 prefill top-1 agreement >= 99%,
# (c) a seed gives the same codes alone and in a batch of 32 (float32; bf16 recorded).
# Writes $OUT/parity.json (the verdict, the reference's own JSON inside it) and keeps the
# exchanged files (request.npz, ref.npz, ref.json) in $OUT/parity_work. Exit status 1 if
# a required check fails. About 5 minutes on an H100 with a cold inductor cache.
#
# Usage (device machine, .whl and bench_carry/ref carried): bash bench/run_parity_gpu.sh
# Every setting is an environment variable, so the same script dry-runs on a CPU:
#   INSTALL=0 PY=.venv/bin/python REF_PY=.refenv/bin/python REF_PATH=.refenv/ref DEVICE=cpu \
#   PRESET=tiny CKPT=/tmp/ckp LENGTHS=30,120 FRAMES=16 BATCH=4 ALONE=2 COMPILE=0 OUT=/tmp/o \
#   bash bench/run_parity_gpu.sh
set -uo pipefail
source bench/device_env.sh
PRESET=${PRESET:-s1-mini}
CKPT=${CKPT:-/tmp/ck}
LENGTHS=${LENGTHS:-30,300}      # prompt lengths in tokens (prompt + FRAMES must fit the model's max_seq_len)
FRAMES=${FRAMES:-64}            # frames per prompt; the <|im_end|> stop is off, so always this many
PRECISION=${PRECISION:-bfloat16} # (b), and (c)'s recorded-only run
BATCH=${BATCH:-32}              # (c): sequences decoded together
ALONE=${ALONE:-4}               # (c): how many of them are rerun alone
COMPILE=${COMPILE:-1}           # 0: eager runner only (CPU dry run: inductor on CPU takes minutes)
CACHE_LEN=${CACHE_LEN:-1024}    # KV positions per slot (32 slots of 8192 in float32 would be 60 GB)
CACHE=${CACHE:-/tmp/inductor-cache}  # kept on a warm machine: a second call loads compiled kernels
REF_TIMEOUT=${REF_TIMEOUT:-240}
OURS_TIMEOUT=${OURS_TIMEOUT:-420}
work=$out/parity_work
mkdir -p "$work"
export TORCHINDUCTOR_CACHE_DIR=$CACHE

[ -f "$CKPT/model.pth" ] || $PY -m s1_mini.testing.make_checkpoint --preset "$PRESET" --out "$CKPT" --seed 0 --no-codec || exit 1

$PY bench/gpu_parity.py prompts --checkpoint "$CKPT" --lengths "$LENGTHS" --frames "$FRAMES" \
  --precision "$PRECISION" --out "$work/request.npz" || exit 1
PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$REF_PATH timeout "$REF_TIMEOUT" $REF_PY bench/reference/ref_gpu_parity.py \
  --checkpoint "$CKPT" --request "$work/request.npz" --device "$DEVICE" --out "$work/ref.npz" \
  --json "$work/ref.json" 2>&1 | grep -v 'Loading model from'  # keeps "All keys matched"
echo "reference exit: ${PIPESTATUS[0]}"
compile=$([ "$COMPILE" = 1 ] && echo --compile || echo --no-compile)
timeout "$OURS_TIMEOUT" $PY bench/gpu_parity.py check --checkpoint "$CKPT" --request "$work/request.npz" \
  --ref "$work/ref.npz" --ref-json "$work/ref.json" --device "$DEVICE" $compile --batch "$BATCH" \
  --alone "$ALONE" --cache-len "$CACHE_LEN" --json "$out/parity.json"
status=$?
echo "ours exit: $status"
exit $status
