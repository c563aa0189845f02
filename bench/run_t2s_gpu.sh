#!/usr/bin/env bash
# One device call: S1-mini-shape random checkpoint, then ours and the reference, same GPU.
# Usage (device machine): bash bench/run_t2s_gpu.sh   (needs .whl and bench_carry/ref carried)
#   COMPILE=1      also ours compiled (bench/t2s_decode.py --compile, batches 1 and 8)
#   REF_COMPILE=1  also the reference compiled as upstream does (inductor, reduce-overhead,
#                  fullgraph): its compile took 175 s on an H100, so give the call the time
#   PROFILE=1      also ours through bench/profile_decode.py at one row (decode step, prefill,
#                  kernel table), each with its own empty inductor cache: untuned, then with
#                  inductor's coordinate-descent tuning (its compile outran 80 s in session 7;
#                  PROFILE_TIMEOUT, default 300 s)
#   BATCHES=1      ours eager at batch 1 only (the default 1,8,32 takes minutes)
set -uo pipefail
source bench/device_env.sh
$PY -m s1_mini.testing.make_checkpoint --preset s1-mini --out /tmp/ck --seed 0 --no-codec || exit 1
$PY bench/t2s_decode.py --checkpoint /tmp/ck --batch-sizes ${BATCHES:-1,8,32} --json $out/ours_eager.json 2>&1 | tail -20
PYTHONPATH=/tmp/site:$REF_PATH timeout ${REF_TIMEOUT:-300} $REF_PY bench/reference/ref_t2s_decode.py --checkpoint /tmp/ck \
  --json $out/ref_eager.json 2>&1 | grep -v INFO | tail -20
if [ -n "${COMPILE:-}" ]; then
  timeout ${COMPILE_TIMEOUT:-300} $PY bench/t2s_decode.py --checkpoint /tmp/ck --batch-sizes 1,8 --compile \
    --json $out/ours_compiled.json 2>&1 | tail -20
fi
if [ -n "${REF_COMPILE:-}" ]; then
  PYTHONPATH=/tmp/site:$REF_PATH timeout ${REF_COMPILE_TIMEOUT:-420} $REF_PY bench/reference/ref_t2s_decode.py \
    --checkpoint /tmp/ck --compile --json $out/ref_compiled.json 2>&1 | grep -v INFO | tail -20
fi
if [ -n "${PROFILE:-}" ]; then
  for cdt in 0 1; do
    echo "== bench/profile_decode.py, one row, coordinate-descent tuning $cdt"
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-profile-$cdt TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=$cdt \
      timeout ${PROFILE_TIMEOUT:-300} $PY bench/profile_decode.py /tmp/ck 1 1 > $out/profile_cdt$cdt.txt 2>&1
    grep -e "compile+capture" -e "prefill 30 ms" -e "prefill 600" -e "B=" -e "GPU kernels" $out/profile_cdt$cdt.txt
  done
fi
