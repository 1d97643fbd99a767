"""`torchrun --nproc_per_node=2 -m train run ...` on the CPU (gloo): sharded data, rank 0 writes alone."""
import subprocess
import sys

import pytest

from core import paths
from core.checkpoints import load_checkpoint
from core.run_store import RunStore
from tests.test_engine import one_thread_env, tiny_config, write_config


def test_two_process_ddp_run_on_cpu(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(2,)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "train", "run", str(path), "--run-name", "ddp", "--device", "cpu", "--quiet"],
        env=one_thread_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = RunStore()
    assert [r["name"] for r in store.list_runs()] == ["ddp"]  # one run, written once
    assert store.get_run("ddp")["state"] == "finished"
    epochs = store.metrics("ddp", "epoch")
    assert [m["epoch"] for m in epochs] == [1, 2]
    # 18 training images: one process takes 3 batches of 6 per epoch, each of 2 ranks takes 9 images -> 1 batch
    assert [m["step"] for m in store.metrics("ddp", "step")] == [1, 2]
    assert all(m["val_acc"] is not None for m in epochs)
    last = load_checkpoint(paths.run_dir("ddp") / "stage1-s1" / "last.pt")
    assert last["epoch"] == 2 and not any(k.startswith("module.") for k in last["model"])
    assert sorted(p.name for p in (paths.run_dir("ddp") / "stage1-s1").iterdir()) == ["best.pt", "last.pt"]


SIGNAL_ONE_RANK = """
import os, signal, sys
from train import engine
real = engine.Trainer._end_epoch
def end_epoch(self, st, epoch, metrics):
    real(self, st, epoch, metrics)
    if epoch == 0 and self.ctx.rank == 1:  # after the epoch's last step: no step is left to share the flag
        os.kill(os.getpid(), signal.SIG{})
engine.Trainer._end_epoch = end_epoch
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("epochs, resumed", [((2,), [(0, 1), (0, 2)]), ((1, 1), [(0, 1), (1, 1)])],
                         ids=["within-a-stage", "at-a-stage-end"])
def test_a_stop_that_reaches_one_rank_stops_them_all_and_resumes(tmp_path, epochs, resumed):
    """The app's Stop signals rank 0's pid only; a signal may also land on one rank between steps (after a stage's
    last epoch the ranks agree on it once the stage has ended, and stop between stages)."""
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=epochs))
    script = tmp_path / "stop_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK.format("TERM"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, str(script), "run", str(path), "--run-name", "one", "--device", "cpu"],
                          env={**one_thread_env(), "PYTHONPATH": str(paths.REPO_ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Connection closed" not in done.stderr, done.stderr[-3000:]  # a stop, no failure
    for said in ("closing signal", "Traceback", "FAILED"):  # torchrun killed no rank and reported no failure
        assert said not in done.stderr, done.stderr[-3000:]
    store = RunStore()
    stored = lambda: [(m["stage"], m["epoch"]) for m in store.metrics("one", "epoch")]  # noqa: E731
    assert store.get_run("one")["state"] == "stopped" and stored() == resumed[:1]
    assert "Run one stopped; `torchrun --nproc_per_node=2 -m train resume one` continues it." in done.stdout
    done = subprocess.run([*torchrun, "-m", "train", "resume", "one", "--device", "cpu", "--quiet"],
                          env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.get_run("one")["state"] == "finished" and stored() == resumed


def test_a_rank_killed_outright_fails_the_run_in_one_sentence_and_it_resumes(tmp_path):
    """The other rank's collective fails (gloo: "Connection reset by peer"): said as what happened and what to do."""
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(2,)))
    script = tmp_path / "kill_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK.format("KILL"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, str(script), "run", str(path), "--run-name", "k", "--device", "cpu", "--quiet"],
                          env={**one_thread_env(), "PYTHONPATH": str(paths.REPO_ROOT)}, capture_output=True, text=True,
                          timeout=300)
    said = ("Another training process of run k ended while this one waited for it (killed, out of memory or crashed: "
            "torchrun's report names it); `torchrun --nproc_per_node=2 -m train resume k` continues from the last "
            "saved checkpoint.")
    assert done.returncode != 0 and f"error: {said}" in done.stderr, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "GLHF" not in done.stderr, done.stderr[-3000:]
    store = RunStore()
    assert (store.get_run("k")["state"], store.get_run("k")["error"]) == ("failed", said)
    done = subprocess.run([*torchrun, "-m", "train", "resume", "k", "--device", "cpu", "--quiet"],
                          env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.get_run("k")["state"] == "finished" and [m["epoch"] for m in store.metrics("k", "epoch")] == [1, 2]
