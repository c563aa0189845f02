#!/usr/bin/env bash
# One device call: the serving sweep (bench/serve_sweep.py) through the real HTTP server,
# then through the SageMaker front, each started on the GPU (inductor + CUDA graphs, bf16,
# one batch of up to 128 streams), waited for until ready, swept, stopped with SIGTERM.
# S1-mini-shape random checkpoint with its full-size codec: speed only.
#
# Usage (device machine, .whl carried): bash bench/run_serve_gpu.sh
#   KINDS="server" or KINDS="sagemaker" runs one front end (two calls on the same warm
#   machine when both do not fit one call: the inductor cache in $CACHE and the checkpoint
#   stay, so the second start loads compiled kernels instead of compiling).
#   PYSPY=SECONDS records the front end's Python stacks with py-spy (carried in .whl) for
#   that long once it is ready (--gil: what holds the interpreter lock, the event loop's
#   and the scheduler thread's share of it), into $OUT/pyspy_KIND.txt (collapsed stacks;
#   bench/pyspy_summary.py sums them per thread).
# Every setting below is an environment variable, so the same script dry-runs on a CPU:
#   INSTALL=0 PY=.venv/bin/python DEVICE=cpu PRECISION=float32 COMPILE=0 PRESET=tiny \
#   SEQ_LEN=0 LEVELS=1,2 FRAMES=8 VOICE_SECONDS=0.05 FRAME_SAMPLES=64 OUT=/tmp/o bash bench/run_serve_gpu.sh
set -uo pipefail
source bench/device_env.sh
PRECISION=${PRECISION:-bfloat16}
COMPILE=${COMPILE:-1}
PRESET=${PRESET:-s1-mini}
CKPT=${CKPT:-/tmp/ckfull}
CACHE=${CACHE:-/tmp/inductor-cache}
KINDS=${KINDS:-server sagemaker}
LEVELS=${LEVELS:-1,8,32,64,128}
FRAMES=${FRAMES:-200}
VOICE_SECONDS=${VOICE_SECONDS:-20}
FRAME_SAMPLES=${FRAME_SAMPLES:-2048}  # S1-mini codec: 2048 samples (1/21.5 s) per frame
SEQ_LEN=${SEQ_LEN:-2048}              # 20 s voice (~470 tokens) + text + 200 frames fit; 0 = the model's 8192
MAX_BATCH=${MAX_BATCH:-128}           # the largest level decodes as one batch
MAX_STREAMS=${MAX_STREAMS:-160}       # open streams allowed: >= the largest level (warm-up and round never overlap)
PORT=${PORT:-8080}
READY_TIMEOUT=${READY_TIMEOUT:-480}   # cold inductor cache: compile + capture of 8 batch buckets takes minutes
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-540}   # the sweep is killed before the call's own limit so the logs come back

[ -f "$CKPT/config.json" ] || $PY -m s1_mini.testing.make_checkpoint --preset "$PRESET" --out "$CKPT" --seed 0 >/dev/null || exit 1

# Engine options shared by both front ends (the SageMaker front reads only S1_MINI_*).
export S1_MINI_MAX_SEQ_LEN=$SEQ_LEN S1_MINI_COMPILE_CACHE_DIR=$CACHE S1_MINI_MAX_QUEUE_SIZE=512 \
       S1_MINI_REQUEST_TIMEOUT=600
compile_flag=--compile
[ "$COMPILE" = 1 ] || compile_flag=--no-compile

record() {  # record KIND PID PATH: py-spy's GIL samples of PID for $PYSPY s once PATH answers 200
  [ -n "${PYSPY:-}" ] || return 0
  local spy=${PYSPY_BIN:-/tmp/site/bin/py-spy}
  (until $PY -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT$3').status_code != 200)" 2>/dev/null; do
     sleep 2; kill -0 "$2" 2>/dev/null || exit 0; done
   "$spy" record --pid "$2" --duration "$PYSPY" --rate 200 --gil --threads --format raw \
     -o "$out/pyspy_$1.txt" > "$out/pyspy_$1.log" 2>&1) &
}

sweep() {  # sweep KIND PID: wait for readiness, run every level, write $out/serve_sweep_KIND.json
  timeout "$SWEEP_TIMEOUT" $PY bench/serve_sweep.py --url "http://127.0.0.1:$PORT" --kind "$1" \
    --concurrency "$LEVELS" --frames "$FRAMES" --voice-seconds "$VOICE_SECONDS" --frame-samples "$FRAME_SAMPLES" \
    --wait-ready "$READY_TIMEOUT" --pid "$2" --json "$out/serve_sweep_$1.json"
  echo "sweep $1 exit: $?"
}

stop() {  # stop NAME PID: SIGTERM, the exit status, GPU memory; the log's end when the sweep failed
  kill -TERM "$2" 2>/dev/null
  wait "$2"
  echo "$1 exit: $?"
  [ -s "$out/serve_sweep_$1.json" ] || tail -30 "$out/$1.log"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader
}

for kind in $KINDS; do
  case $kind in
    server)
      $PY -m s1_mini.server --checkpoint "$CKPT" --host 127.0.0.1 --port "$PORT" --device "$DEVICE" \
        --precision "$PRECISION" $compile_flag --max-batch-size "$MAX_BATCH" --max-concurrent-streams "$MAX_STREAMS" \
        --max-new-tokens "$FRAMES" --log-level warning > "$out/server.log" 2>&1 &
      pid=$!
      record server $pid /ready
      sweep server $pid
      stop server $pid
      ;;
    sagemaker)
      # The front serves $SAGEMAKER_BASE_DIR/model: the checkpoint itself (no code/, so our handlers).
      base=${SAGEMAKER_BASE_DIR:-/tmp/ml}
      mkdir -p "$base" && ln -sfn "$CKPT" "$base/model"
      [ "$COMPILE" = 1 ] && compile=true || compile=false
      SAGEMAKER_BASE_DIR=$base S1_MINI_ENGINES=1 S1_MINI_DEVICE=$DEVICE S1_MINI_PRECISION=$PRECISION \
      S1_MINI_COMPILE=$compile S1_MINI_MAX_BATCH_SIZE=$MAX_BATCH S1_MINI_MAX_CONCURRENT_STREAMS=$MAX_STREAMS \
      S1_MINI_MAX_NEW_TOKENS=$FRAMES \
        $PY -m s1_mini.sagemaker.serve serve --host 127.0.0.1 --port "$PORT" > "$out/sagemaker.log" 2>&1 &
      pid=$!
      record sagemaker $pid /ping
      sweep sagemaker $pid
      stop sagemaker $pid
      ;;
    *) echo "KINDS: unknown kind $kind (server, sagemaker)"; exit 2 ;;
  esac
done
