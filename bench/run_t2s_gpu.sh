#!/usr/bin/env bash
# One device call: S1-mini-shape random checkpoint, then ours and the reference, same GPU.
# Usage (device machine): bash bench/run_t2s_gpu.sh   (needs .whl and bench_carry/ref carried)
set -uo pipefail
out=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m s1_mini.testing.make_checkpoint --preset s1-mini --out /tmp/ck --seed 0 --no-codec || exit 1
python3 bench/t2s_decode.py --checkpoint /tmp/ck --batch-sizes ${BATCHES:-1,8,32} --json $out/ours_eager.json 2>&1 | tail -20
PYTHONPATH=/tmp/site:$PWD/bench_carry/ref timeout ${REF_TIMEOUT:-300} python3 bench/reference/ref_t2s_decode.py --checkpoint /tmp/ck --json $out/ref_eager.json 2>&1 | grep -v INFO | tail -20
if [ -n "${COMPILE:-}" ]; then
  timeout ${COMPILE_TIMEOUT:-300} python3 bench/t2s_decode.py --checkpoint /tmp/ck --batch-sizes 1,8 --compile --json $out/ours_compiled.json 2>&1 | tail -20
fi
