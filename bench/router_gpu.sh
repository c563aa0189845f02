#!/usr/bin/env bash
# One GPU, the SageMaker front with 1 and then 2 engine processes (S1_MINI_ENGINES):
# two rounds of 16 concurrent invocations of 200 frames each (the first round also
# meets new batch shapes); aggregate audio seconds per second of the second round.
# Usage (device machine): bash bench/router_gpu.sh /tmp/ml   (model/ holds the checkpoint)
set -uo pipefail
base=$1
for engines in 1 2; do
  SAGEMAKER_BASE_DIR=$base S1_MINI_ENGINES=$engines S1_MINI_DEVICE=cuda S1_MINI_PRECISION=bfloat16 \
  S1_MINI_MAX_BATCH_SIZE=16 S1_MINI_MAX_SEQ_LEN=2048 S1_MINI_MAX_NEW_TOKENS=200 \
    python3 -m s1_mini.sagemaker.serve serve --host 127.0.0.1 --port 8080 > /tmp/serve_$engines.log 2>&1 &
  pid=$!
  python3 - "$engines" "$pid" <<'PY' || { tail -20 /tmp/serve_$engines.log; kill -TERM $pid; exit 1; }
import concurrent.futures, json, os, sys, time, httpx
engines, pid = int(sys.argv[1]), int(sys.argv[2])
start = time.time()
while True:
    os.kill(pid, 0)  # fails fast if serve died
    try:
        if httpx.get("http://127.0.0.1:8080/ping", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(1)
    assert time.time() - start < 300, "not ready in 300 s"
ready = time.time() - start
def call(i):
    r = httpx.post("http://127.0.0.1:8080/invocations", json={"text": f"Request {i}: the quick brown fox jumps over the lazy dog.", "seed": i}, headers={"Accept": "application/json"}, timeout=300)
    r.raise_for_status()
    return r.json()["audio_seconds"]
for rnd in range(2):
    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        audio = sum(pool.map(call, range(16)))
    wall = time.time() - t
    print(json.dumps({"engines": engines, "round": rnd, "ready_s": round(ready, 1), "c16_wall_s": round(wall, 2),
                      "audio_s": round(audio, 1), "audio_s_per_s": round(audio / wall, 2)}), flush=True)
PY
  kill -TERM $pid; wait $pid; echo "serve exit ($engines engines): $?"
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
