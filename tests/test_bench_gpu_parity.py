"""CPU smoke run of the GPU correctness check (bench/run_parity_gpu.sh, bench/gpu_parity.py
and bench/reference/ref_gpu_parity.py) on the tiny random checkpoint: the device script's
dry-run path end to end (eager runner: inductor on a 2-core CPU takes minutes), then a
negative control that a reference differing at one frame makes the check fail there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".refenv" / "bin" / "python"
FRAMES = 16

pytestmark = [pytest.mark.parity,
              pytest.mark.skipif(not REF_PYTHON.exists(),
                                 reason="reference env .refenv missing: run bash tests/parity/build_reference_env.sh")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, str, dict[str, Any]]:
    """(output folder, stdout, parity.json) of the device script run on the CPU."""
    tmp = tmp_path_factory.mktemp("gpu_parity")
    env = {**os.environ, "INSTALL": "0", "PY": sys.executable, "REF_PY": str(REF_PYTHON),
           "REF_PATH": str(ROOT / ".refenv" / "ref"), "DEVICE": "cpu", "PRESET": "tiny", "CKPT": str(tmp / "ck"),
           "LENGTHS": "30,120", "FRAMES": str(FRAMES), "BATCH": "4", "ALONE": "2", "COMPILE": "0",
           "OUT": str(tmp / "out"), "CACHE": str(tmp / "inductor")}
    done = subprocess.run(["bash", "bench/run_parity_gpu.sh"], check=False, capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, done.stdout, json.loads((tmp / "out" / "parity.json").read_text())


def test_dry_run_passes_every_check(dry_run):
    _, stdout, result = dry_run
    print(stdout)
    assert result["pass"] is True and result["device"] == "cpu" and result["compiled"] is False
    assert result["prompt_lengths"] == [30, 120] and result["frames"] == FRAMES
    assert set(result["checks"]) == {"greedy_float32_eager", "batch_float32", "prefill_top1_bfloat16", "batch_bfloat16"}
    for length in ("30", "120"):
        entry = result["checks"]["greedy_float32_eager"]["prompts"][length]
        assert entry == {"frames_compared": FRAMES, "equal_fraction": 1.0, "first_diff": None}
    top1 = result["checks"]["prefill_top1_bfloat16"]
    assert top1["positions"] == 150 and top1["agreement"] >= 0.99
    batch = result["checks"]["batch_float32"]
    assert batch["pass"] is True and batch["checked_slots"] == [0, 3] and batch["noise"] == "generator"
    assert result["checks"]["batch_bfloat16"]["pass"] is None  # recorded, not required
    assert result["reference"]["impl"] == "reference" and result["reference"]["errors"] == {}
    assert result["reference"]["greedy_params"] == [0.80078125, 0.80078125, 1.296875]  # bf16-rounded
    # one line per check
    for line in ("PASS (a) greedy float32 eager", "PASS (b) bfloat16 prefill top-1", "PASS (c) float32 seed",
                 "INFO (c) bfloat16 seed", "PASS overall", "All keys matched successfully"):
        assert line in stdout, line


def test_a_reference_that_differs_fails_at_its_frame(dry_run):
    tmp, _, _ = dry_run
    work = tmp / "out" / "parity_work"
    ref = dict(np.load(work / "ref.npz"))
    ref["greedy_1"][5:, 2] += 1  # frame 5 onwards, codebook 1 of the 120-token prompt
    np.savez(tmp / "bad.npz", **ref)
    done = subprocess.run([sys.executable, "bench/gpu_parity.py", "check", "--checkpoint", str(tmp / "ck"),
                           "--request", str(work / "request.npz"), "--ref", str(tmp / "bad.npz"), "--device", "cpu",
                           "--no-compile", "--batch", "2", "--alone", "1", "--json", str(tmp / "bad.json")],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "FAIL (a) greedy float32 eager" in done.stdout and "first diff frame 5 row 2" in done.stdout
    entry = json.loads((tmp / "bad.json").read_text())["checks"]["greedy_float32_eager"]["prompts"]["120"]
    assert entry["first_diff"] == [5, 2] and entry["equal_fraction"] < 1
    assert entry["ref_top2_gap_there"] > 0
