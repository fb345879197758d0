"""``make demo``: all of DDB on the embedded toy domains, and the table it ends with.

Generates the toy domains (once), runs ``configs/demo.py`` (source-only and oracle
baselines, then both rounds of DDB) in ``runs/demo``, prints the summary table
with the share of the source-only -> oracle gap the final student recovers, and draws
``runs/demo/predictions.png`` and ``runs/demo/miou.png`` (:mod:`ddb_jax.demo.pictures`). A
rerun skips finished stages; ``rm -rf runs/demo`` starts over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TOY_DIR = os.path.join("data", "toy")
WORKDIR = os.path.join("runs", "demo")


def gap_report(summary: dict) -> str:
    """How much of the domain gap (oracle - source-only) the last DDB student closes."""
    rows = summary["stages"]
    if "source_only" not in rows or "oracle" not in rows:
        return ""
    final = [n for n in rows if n.endswith("_ckd")]
    low, high = rows["source_only"]["miou"], rows["oracle"]["miou"]
    lines = [f"domain gap (oracle - source-only): {100 * (high - low):.2f} mIoU"]
    if final and high > low:
        last = final[-1]
        share = (rows[last]["miou"] - low) / (high - low)
        lines.append(f"{last} recovers {100 * share:.0f}% of the gap")
    return "\n".join(lines)


def main() -> int:
    started = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notices
    if not os.path.isdir(os.path.join(TOY_DIR, "gta")):
        subprocess.run([sys.executable, "-m", "input_pipeline.toy", "--out", TOY_DIR], check=True)
    command = [
        sys.executable, "-m", "ddb_jax.main", "--config=configs/demo.py",
        f"--workdir={WORKDIR}", *sys.argv[1:],
    ]  # fmt: skip
    os.makedirs(WORKDIR, exist_ok=True)
    log_path = os.path.join(WORKDIR, "demo.log")
    print(f"running the DDB pipeline on the toy domains (logs: {log_path})", flush=True)
    with open(log_path, "a") as log:  # every stage's output; the table is printed below
        done = subprocess.run(command, stdout=log, stderr=log)
    if done.returncode:
        with open(log_path) as f:
            print("".join(f.readlines()[-30:]), file=sys.stderr)
        print(f"the demo failed (exit {done.returncode}); full log: {log_path}", file=sys.stderr)
        return done.returncode
    with open(os.path.join(WORKDIR, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(WORKDIR, "summary.md")) as f:
        print(f.read().rstrip())
    print(gap_report(summary))
    from ddb_jax.demo import pictures  # runs the models here: JAX and TensorFlow load only now

    for path in pictures.write_demo_pictures(WORKDIR):
        print(f"wrote {path}")
    print(f"(demo wall time {time.time() - started:.0f} s; results in {WORKDIR}/summary.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
