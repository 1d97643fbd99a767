"""The demo pipeline's promise: ResNet-50, under 5 minutes on 2 CPU cores, >= 90% validation accuracy
on its last stage (the long-tailed `shapes-lt`).

Runs `python -m train run train/configs/demo.yaml` exactly as a user would (a fresh ResLens home, so the
image cache is built inside the timing), then reads the run store and prints the wall time, its ratio to
the 5-minute budget, and every stage's best validation accuracy. Keeps the home for
`bench/gradcam_quality.py` (its checkpoint path is printed).

    python bench/demo.py [--home DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.run_store import RunStore  # noqa: E402

BUDGET_S = 300.0
GOAL_ACC = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--home", help="ResLens home for the run (default: a new temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (the machine has 2 cores)")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="reslens-demo-")).resolve()
    env = {**os.environ, "RESLENS_HOME": str(home), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "train", "run", "train/configs/demo.yaml", "--run-name", "demo"]
    home.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(home / "bench-demo.log", "w") as log:  # the epoch lines, with their timings
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"the demo run failed (exit {done.returncode}); see {home}/bench-demo.log")
        return 1
    store = RunStore(home / "reslens.sqlite")
    stages = store.stages("demo")
    for stage in stages:
        print(f"stage {stage['idx'] + 1} ({stage['name']}, {stage['dataset']}): "
              f"best val acc {stage['best_val_acc']:.3f}")
    last = stages[-1]
    final = store.metrics("demo", "epoch", stage=last["idx"])[-1]
    print(f"last stage, last epoch: val acc {final['val_acc']:.3f}, balanced {final['val_balanced_acc']:.3f}")
    print(f"wall time {wall:.0f} s = {wall / BUDGET_S:.2f} x the 5-minute budget (goal <= 1.00)")
    print(f"best val acc of the last stage {last['best_val_acc']:.3f} (goal >= {GOAL_ACC:.2f})")
    print(f"checkpoint: {last['best_path']}")
    ok = wall <= BUDGET_S and last["best_val_acc"] >= GOAL_ACC
    print("goals met" if ok else "goals NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
