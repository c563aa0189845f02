"""Who held the GIL in a py-spy recording (``py-spy record --gil --threads --format raw``,
as ``bench/run_serve_gpu.sh`` takes with ``PYSPY=seconds``): samples per thread, and per
thread the functions of this project (or, without one, the innermost frame) that were
running, most first.

    python bench/pyspy_summary.py OUT/pyspy_server.txt [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import re

THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): (.*)$")


def summarize(path: str, top: int) -> str:
    threads: collections.Counter = collections.Counter()
    functions: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    with open(path) as recording:
        lines = recording.read().splitlines()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        match = THREAD.match(frames[0])
        thread = match.group(1) if match else "?"
        frames = frames[1:] if match else frames
        n = int(count)
        total += n
        threads[thread] += n
        ours = [f for f in frames if "s1_mini/" in f]
        functions[thread][(ours[-1] if ours else frames[-1] if frames else "(no Python frame)")] += n
    report = [f"{total} samples holding the GIL"]
    for thread, n in threads.most_common():
        report.append(f"{n:7d} {100 * n / total:5.1f}%  {thread}")
        for name, k in functions[thread].most_common(top):
            report.append(f"          {100 * k / total:5.1f}%  {name}")
    return "\n".join(report)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    print(summarize(args.path, args.top))


if __name__ == "__main__":
    main()
