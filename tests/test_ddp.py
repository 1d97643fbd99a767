"""`torchrun --nproc_per_node=2 -m train run ...` on the CPU (gloo): sharded data, rank 0 writes alone."""
import subprocess
import sys

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
