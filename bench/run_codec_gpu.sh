#!/usr/bin/env bash
# One device call: the full-size S1 codec (random weights, official config), ours (eager,
# then compiled as the engine runs it: inductor Snake, streaming steps in CUDA graphs) and
# the reference, same GPU, same call: offline decode at batch 1 and batched, our incremental
# decode (chunks of 1 and 4 frames), encode, peak memory. Writes $OUT/codec_ours.json,
# $OUT/codec_ours_compiled.json and $OUT/codec_ref.json.
#
# Usage (device machine, .whl and bench_carry/ref carried): bash bench/run_codec_gpu.sh
# Every setting is an environment variable, so the same script dry-runs on a CPU:
#   INSTALL=0 PY=.venv/bin/python REF_PY=.refenv/bin/python REF_PATH=.refenv/ref DEVICE=cpu \
#   PRECISION=float32 PRESET=tiny AUDIO_SECONDS=0.5 BATCHES=1,2 CKPT=/tmp/ckc OUT=/tmp/o bash bench/run_codec_gpu.sh
set -uo pipefail
source bench/device_env.sh
PRECISION=${PRECISION:-bfloat16}
PRESET=${PRESET:-s1-mini}
CKPT=${CKPT:-/tmp/ckcodec}
AUDIO_SECONDS=${AUDIO_SECONDS:-10}  # not $SECONDS: bash's own counter
BATCHES=${BATCHES:-1,8,32}
REF_TIMEOUT=${REF_TIMEOUT:-300}

# The codec alone: the text-to-semantic weights (1.4 GB of random bf16) are not needed here.
[ -f "$CKPT/codec.pth" ] || $PY -c "import sys; from s1_mini.testing.codec_checkpoint import write_codec_checkpoint as w; w(sys.argv[1], sys.argv[2], 0)" "$CKPT" "$PRESET" || exit 1

common=(--checkpoint "$CKPT" --device "$DEVICE" --precision "$PRECISION" --seconds "$AUDIO_SECONDS" --batches "$BATCHES")
$PY bench/codec_bench.py "${common[@]}" --json "$out/codec_ours.json"
echo "ours exit: $?"
$PY bench/codec_bench.py "${common[@]}" --compile --json "$out/codec_ours_compiled.json"
echo "ours compiled exit: $?"
PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$REF_PATH timeout "$REF_TIMEOUT" $REF_PY bench/reference/ref_codec_bench.py \
  "${common[@]}" --json "$out/codec_ref.json" 2>&1 | grep -v -e WeightNorm -e weight_norm
echo "reference exit: ${PIPESTATUS[0]}"
