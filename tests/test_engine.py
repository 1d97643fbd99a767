"""The training engine on a tiny Caltech-layout fixture (ResNet-18 at 32 px, a few dozen JPEGs)."""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from core import paths
from core.checkpoints import REQUIRED_KEYS, load_checkpoint, save_checkpoint
from core.datasets import class_counts, open_dataset
from core.errors import UserError
from core.run_store import RunStore, RunStoreError
from tests.data_fixtures import make_caltech101
from train import distributed as ddp
from train import engine
from train.config import load_config, parse_config
from train.device_batches import DeviceBatches
from train.engine import Trainer, TrainingFailed, class_weights, lr_lambda, train_run

TINY_SIZES = {"ant": 8, "bee": 8, "cat": 8}  # 3 classes; the split keeps 2 of each for val


def one_thread_env() -> dict[str, str]:
    """The environment for trainer subprocesses: this test's RESLENS_HOME, one OpenMP thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tests 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(root: Path, epochs: tuple[int, ...] = (2, 2), **stage: object) -> dict:
    """A pipeline dict: len(epochs) stages on the fixture set, each from the previous one's best."""
    make_caltech101(root, TINY_SIZES)
    stages = []
    for i, n in enumerate(epochs):
        stages.append({"name": f"s{i + 1}", "dataset": "caltech101", "root": str(root), "epochs": n,
                       "batch_size": 6, "image_size": 32, "lr": 0.01, "warmup_epochs": 0,
                       "init": "previous" if i else "scratch", **stage})
    return {"name": "tiny", "arch": "resnet18", "seed": 0, "stages": stages}


def write_config(folder: Path, raw: dict) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_tiny(raw: dict, name: str = "tiny", resume: bool = False, store: RunStore | None = None) -> str:
    from train.jobs import prepare_run

    config = parse_config(raw)
    store = store or RunStore()
    if not resume:
        prepare_run(config, store, name)
    ctx = ddp.Dist(0, 1, torch.device("cpu"))
    return train_run(config, name, ctx, store, resume=resume, show_progress=False)


def test_two_stage_run_records_everything(tmp_path, monkeypatch):
    inits = []
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda arch, n, init, names: inits.append((init, names))
                        or real_build(arch, n, init, names))
    assert run_tiny(tiny_config(tmp_path)) == "finished"
    store = RunStore()
    run = store.get_run("tiny")
    assert run["state"] == "finished" and run["error"] is None
    epochs = store.metrics("tiny", "epoch")
    assert [(m["stage"], m["epoch"]) for m in epochs] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(m["val_acc"] is not None and m["val_balanced_acc"] is not None and m["images_per_s"] for m in epochs)
    steps = store.metrics("tiny", "step", stage=0)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # 18 train images / batch 6 = 3 steps per epoch
    times = [m["time"] for m in steps]  # when each step ran, before its epoch's row
    assert times == sorted(times) and len(set(times)) == 6 and times[-1] <= epochs[1]["time"]
    stages = store.stages("tiny")
    assert [s["class_names"] for s in stages] == [["ant", "bee", "cat"]] * 2
    stage1 = paths.run_dir("tiny") / "stage1-s1"
    classes = ["ant", "bee", "cat"]  # the same classes in both stages: the second keeps the first's head
    assert inits == [("scratch", classes), (str(stage1 / "best.pt"), classes)]
    last = load_checkpoint(stage1 / "last.pt")
    assert all(k in last for k in REQUIRED_KEYS + ("config_hash",))
    assert not {"optimizer", "scheduler", "trainer_state"} & set(last)  # a finished stage never resumes
    assert (last["epoch"], last["batches_done"], last["class_names"]) == (2, 0, ["ant", "bee", "cat"])
    assert stages[0]["best_path"] == str(stage1 / "best.pt") and stages[0]["best_val_acc"] is not None
    best = load_checkpoint(stage1 / "best.pt")  # weights only: no optimizer state doubling its size
    assert not {"optimizer", "scheduler", "trainer_state"} & set(best)
    result = store.class_results("tiny", 1)
    assert result["epoch"] == 2 and sum(result["val_counts"]) == 6 and len(result["confusion"]) == 3
    assert store.class_result_epochs("tiny", 0) == [1, 2]
    wrong = store.misclassified("tiny", 1)
    assert len(wrong) == 6 - sum(result["correct"])
    assert all(Path(w["source"]).is_file() for w in wrong)
    for index, stage in enumerate(stages):  # each stage keeps its best epoch's images besides its last's (an
        assert set(store.misclassified_epochs("tiny", index)) <= {stage["best_epoch"], 2}  # epoch with none: none)


def test_nan_loss_fails_with_advice(tmp_path, monkeypatch):
    class Diverging(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    monkeypatch.setattr(engine.nn, "CrossEntropyLoss", Diverging)
    with pytest.raises(TrainingFailed):
        run_tiny(tiny_config(tmp_path, epochs=(1,)))
    run = RunStore().get_run("tiny")
    assert run["state"] == "failed"
    assert "loss became NaN" in run["error"] and "lower learning rate" in run["error"]


def test_non_finite_validation_outputs_fail_with_advice_before_anything_is_saved(tmp_path, monkeypatch):
    real_build = engine.build_model

    def broken_in_eval(*args):
        model = real_build(*args)
        model.register_forward_hook(lambda m, inputs, out: out if m.training else out * float("nan"))
        return model

    monkeypatch.setattr(engine, "build_model", broken_in_eval)
    with pytest.raises(TrainingFailed, match=r"validation loss became NaN in stage 1 \(s1\) after epoch 1; "
                                             r"try a lower learning rate"):
        run_tiny(tiny_config(tmp_path, epochs=(1,)))
    assert RunStore().get_run("tiny")["state"] == "failed"
    assert not (paths.run_dir("tiny") / "stage1-s1" / "best.pt").exists()


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, epochs=(2, 1))
    real_after = Trainer._after_step

    def after_step(self, st, epoch, loss, lr, images):
        real_after(self, st, epoch, loss, lr, images)
        if st.index == 0 and st.step == 4:  # second step of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    assert run_tiny(raw) == "stopped"
    store = RunStore()
    assert store.get_run("tiny")["state"] == "stopped"
    last = load_checkpoint(paths.run_dir("tiny") / "stage1-s1" / "last.pt")
    assert (last["epoch"], last["batches_done"], last["step"]) == (1, 2, 5)  # the step under way is applied
    assert signal.getsignal(signal.SIGTERM) is not engine.StopFlag._handle  # handlers restored
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    assert run_tiny(raw, resume=True) == "finished"
    epochs = store.metrics("tiny", "epoch")
    assert [(m["stage"], m["epoch"]) for m in epochs] == [(0, 1), (0, 2), (1, 1)]
    assert [m["step"] for m in store.metrics("tiny", "step", stage=0)] == [1, 2, 3, 4, 5, 6]


TIMED = ("time", "images_per_s", "epoch_time_s")


def run_record(name: str, raw: dict) -> dict:
    """Everything a run produced that must not depend on being stopped: metric rows, per-class results, weights."""
    store = RunStore()
    rows = {kind: [{k: v for k, v in r.items() if k not in TIMED} for r in store.metrics(name, kind)]
            for kind in ("step", "epoch")}
    classes = [store.class_results(name, s["idx"], e) for s in store.stages(name)
               for e in store.class_result_epochs(name, s["idx"])]
    weights = {}
    for i, stage in enumerate(raw["stages"]):
        for kind in ("best", "last"):
            ckpt = load_checkpoint(paths.run_dir(name) / f"stage{i + 1}-{stage['name']}" / f"{kind}.pt")
            weights[(i, kind)] = ckpt["model"]
    return {"rows": rows, "classes": [{k: v for k, v in c.items() if k != "time"} for c in classes],
            "weights": weights}


def assert_same_run(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]  # floats compared exactly
    assert a["classes"] == b["classes"]
    assert a["weights"].keys() == b["weights"].keys()
    for key, state in a["weights"].items():
        other = b["weights"][key]
        assert state.keys() == other.keys()
        assert all(torch.equal(state[k], other[k]) for k in state), key


@pytest.mark.parametrize("stop_step, workers, recipe, data_path",  # mid-epoch: with a recipe, or on the device
                         [(3, 1, {}, "workers"),
                          (5, 0, {"mix": "both", "ema": 0.9, "tta": True}, "workers"), (5, 0, {}, "device"),
                          (3, 0, {"mix": "both", "ema": 0.9, "tta": True}, "device"),
                          (5, 1, {"train_size_start": 24, "train_size_ramp": 1.0, "image_size": 40}, "workers")],
                         ids=["epoch-boundary", "mid-epoch-mix-ema-tta", "mid-epoch-device-path",
                              "epoch-boundary-device-path-mix-ema-tta", "mid-epoch-resolution-schedule"])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, stop_step, workers, recipe, data_path):
    """SIGTERM mid-epoch (after step 5 of 3-step epochs) or during an epoch's last step, then resume in a
    process whose random generators have moved on: the same metrics and weights, bit for bit (also with
    MixUp/CutMix, whose draws come from the restored RNG, and an EMA of the weights, kept in trainer_state;
    and with batches augmented on the device, train/device_batches.py, whose draws are seeded per batch)."""
    import random

    import numpy as np

    second = 2 if "train_size_start" in recipe else 1  # a resolution schedule needs 2 epochs in every stage
    raw = tiny_config(tmp_path, epochs=(3, second), augment="strong", num_workers=workers, label_smoothing=0.1,
                      **recipe)
    raw["stages"][1]["imbalance"] = "weighted_sampler"
    raw["data_path"] = data_path
    kinds = []  # what the device path augmented (train/device_batches.py)
    real_iter = DeviceBatches.__iter__
    monkeypatch.setattr(DeviceBatches, "__iter__", lambda self: kinds.append(self.kind) or real_iter(self))
    assert run_tiny(raw, "whole") == "finished"
    whole = run_record("whole", raw)
    real_after = Trainer._after_step

    def after_step(self, st, epoch, loss, lr, images):
        real_after(self, st, epoch, loss, lr, images)
        if st.index == 0 and st.step == stop_step - 1:  # the stop lands during the next step
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    assert run_tiny(raw, "cut") == "stopped"
    last = load_checkpoint(paths.run_dir("cut") / "stage1-s1" / "last.pt")
    assert (last["epoch"], last["batches_done"]) == ((1, 2) if stop_step == 5 else (1, 0))
    assert ("ema" in last["trainer_state"]) == ("ema" in recipe)
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)  # a fresh process would differ too
    assert run_tiny(raw, "cut", resume=True) == "finished"
    assert_same_run(whole, run_record("cut", raw))
    assert set(kinds) == ({"strong", "none"} if data_path == "device" else set())


def test_the_log_says_how_a_run_ended_before_the_store_does(tmp_path, monkeypatch, capsys):
    """A reader who sees the stored state 'stopped' or 'finished' finds the run's last line in its log (the app
    and CI read the log as soon as the state changes; it used to be printed after)."""
    printed = []
    real_set_state = RunStore.set_state

    def set_state(self, name, state, **kw):
        printed.append((state, capsys.readouterr().out))
        return real_set_state(self, name, state, **kw)

    monkeypatch.setattr(RunStore, "set_state", set_state)
    raw = tiny_config(tmp_path, epochs=(2,))
    config = parse_config(raw)
    from train.jobs import prepare_run

    prepare_run(config, RunStore(), "tiny")
    cpu = ddp.Dist(0, 1, torch.device("cpu"))
    real_after = Trainer._after_step
    monkeypatch.setattr(Trainer, "_after_step", lambda self, *a: os.kill(os.getpid(), signal.SIGTERM))
    assert train_run(config, "tiny", cpu, RunStore()) == "stopped"
    assert printed[-1][0] == "stopped" and "Run tiny stopped;" in printed[-1][1]
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    assert train_run(config, "tiny", cpu, RunStore(), resume=True) == "finished"
    assert printed[-1][0] == "finished" and "Run tiny finished." in printed[-1][1]


def test_a_stop_that_lands_after_the_last_epoch_lets_the_run_finish(tmp_path, monkeypatch):
    """SIGTERM while a trained run deletes its older checkpoints (retention) and stores "finished": the run
    finishes (it used to end with 'stopped by SIGTERM', its state left 'running', its retention half done)."""
    from train import retention
    from train.signals import Terminated, raise_on_stop

    real_retention = retention.apply_retention

    def stopped_meanwhile(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_retention(*args)

    monkeypatch.setattr(retention, "apply_retention", stopped_meanwhile)
    raw = {**tiny_config(tmp_path, epochs=(1, 1)), "retention": "final"}
    try:
        with raise_on_stop():  # what every command but training does with a SIGTERM
            assert run_tiny(raw) == "finished"
    except Terminated:  # a KeyboardInterrupt: let it fail this test, not end the session
        pytest.fail("the stop ended the finished run")
    assert RunStore().get_run("tiny")["state"] == "finished"
    assert not list((paths.run_dir("tiny") / "stage1-s1").glob("*.pt"))
    assert all(s["best_path"] is None for s in RunStore().stages("tiny")[:1])


def test_a_stop_during_a_stages_last_validation_ends_that_stage_first(tmp_path, monkeypatch):
    """SIGTERM while a stage validates its last epoch: the stage's bookkeeping (its TensorBoard hyperparameters,
    its completed epochs) is done before the run stops between stages, and in the last stage the run finishes
    (it used to be stored 'stopped' with the stage's hyperparameters lost for good)."""
    from train.tensorboard_log import TensorBoardLog

    ended = []
    monkeypatch.setattr(TensorBoardLog, "hparams", lambda self, stage, *a: ended.append(stage))
    real_validate = Trainer._validate

    def validate(self, st, epoch, *args, **kwargs):
        if epoch + 1 == st.stage.epochs:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(self, st, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_validate", validate)
    raw = tiny_config(tmp_path, epochs=(1, 2))
    assert run_tiny(raw) == "stopped" and ended == ["stage1-s1"]
    assert [s["completed_epochs"] for s in RunStore().stages("tiny")] == [1]
    assert run_tiny(raw, resume=True) == "finished" and ended == ["stage1-s1", "stage2-s2"]
    assert RunStore().get_run("tiny")["state"] == "finished"


def test_ctrl_c_twice_while_a_trained_run_finishes_leaves_it_finished(tmp_path, monkeypatch):
    """Two SIGINTs while the run finishes, handled off the main thread (OpenMP, tqdm): the second one used to
    raise KeyboardInterrupt once "finished" was stored, and the command exited 130."""
    import threading

    from train import retention

    real_retention = retention.apply_retention

    def ctrl_c_twice(*args):
        ready, done = threading.Event(), threading.Event()

        def receive():  # the main thread blocks SIGINT here: the kernel hands it to this thread
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            ready.set()
            done.wait()

        receiver = threading.Thread(target=receive)
        receiver.start()
        ready.wait()
        try:
            for _ in range(2):  # the main thread runs the Python handler between the two
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
        finally:
            done.set()
            receiver.join()
        return real_retention(*args)

    monkeypatch.setattr(retention, "apply_retention", ctrl_c_twice)
    try:
        assert run_tiny(tiny_config(tmp_path, epochs=(1,))) == "finished"
    except KeyboardInterrupt:
        pytest.fail("a second Ctrl-C after the last epoch interrupted a finished run")
    assert RunStore().get_run("tiny")["state"] == "finished"


def test_a_retention_that_fails_keeps_the_rest_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    from train import retention

    def refused(*args):
        raise PermissionError(13, "Permission denied", "stage1-s1/best.pt")

    monkeypatch.setattr(retention, "apply_retention", refused)
    config = parse_config({**tiny_config(tmp_path, epochs=(1, 1)), "retention": "final"})
    from train.jobs import prepare_run

    prepare_run(config, RunStore(), "tiny")
    assert train_run(config, "tiny", ddp.Dist(0, 1, torch.device("cpu")), RunStore()) == "finished"
    assert RunStore().get_run("tiny")["state"] == "finished"
    assert "Retention stopped partway ([Errno 13] Permission denied: 'stage1-s1/best.pt'); the earlier stages' " \
           "checkpoints it did not delete are kept." in capsys.readouterr().out
    assert (paths.run_dir("tiny") / "stage1-s1" / "best.pt").is_file()


def test_a_second_trainer_of_a_run_is_refused_before_it_writes(tmp_path, monkeypatch):
    """Two resumes started together both found the stored trainer dead and both trained; the run's lock, held by
    the first, refuses the second before it touches the store or the checkpoints."""
    import subprocess
    import sys

    raw = tiny_config(tmp_path, epochs=(2,))
    real_after = Trainer._after_step
    monkeypatch.setattr(Trainer, "_after_step", lambda self, *a: os.kill(os.getpid(), signal.SIGTERM))
    assert run_tiny(raw) == "stopped"
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    last = paths.run_dir("tiny") / "stage1-s1" / "last.pt"
    before = (RunStore().get_run("tiny")["stored_state"], last.read_bytes())
    holder = subprocess.Popen(  # the first resume, training (a lock of another process: record locks are per process)
        [sys.executable, "-c", "import sys, time\nfrom train.trainer_lock import trainer_lock\n"
         "with trainer_lock('tiny'):\n    print('held', flush=True)\n    time.sleep(120)"],
        cwd=paths.REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunStoreError, match="'tiny' is being trained by another process right now"):
            run_tiny(raw, resume=True)
        assert (RunStore().get_run("tiny")["stored_state"], last.read_bytes()) == before
    finally:
        holder.kill()
        holder.wait()
    said: list[str] = []
    monkeypatch.setattr(engine.Display, "message", lambda self, text: said.append(text))
    assert run_tiny(raw, resume=True) == "finished"  # the lock went with its holder (kill -9)
    assert said[0] == "Resuming tiny in stage 1 (s1) at epoch 1, after its step 2 (pipeline step 3)."  # stop: step 2


def test_the_resume_line_says_where_a_run_continues(tmp_path):
    from train.engine import ResumePoint, resume_line

    config = parse_config(tiny_config(tmp_path), check_data=False)
    assert resume_line(config, "r", ResumePoint(1), 6) == "Resuming r at the start of stage 2 (s2) (pipeline step 7)."
    assert resume_line(config, "r", ResumePoint(0, {"epoch": 1}), 3) == \
        "Resuming r in stage 1 (s1) at the start of epoch 2 (pipeline step 4)."
    assert resume_line(config, "r", ResumePoint(2), 12) == "Resuming r: every stage is done; only its final state " \
                                                             "is recorded."


def rename_a_training_image(root: Path) -> tuple[Path, Path]:
    """Rename one training image so that it stays one (the split hashes file names): (old path, new path)."""
    old = open_dataset("caltech101", root, "train").files[0]
    for number in range(2000, 2100):
        new = old.rename(old.with_name(f"image_{number}.jpg"))
        if new in open_dataset("caltech101", root, "train").files:
            return old, new
        new.rename(old)
    raise AssertionError("no new name kept the image in the training split")


def test_resume_refuses_a_changed_config_or_order(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, epochs=(2,))
    real_after = Trainer._after_step

    def stop_after_first(self, st, epoch, loss, lr, images):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_after_step", stop_after_first)
    assert run_tiny(raw) == "stopped"
    last = paths.run_dir("tiny") / "stage1-s1" / "last.pt"
    assert RunStore().stages("tiny")[0]["last_path"] == str(last)  # the app reads "Resume continues" from it
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    changed = {**raw, "stages": [{**raw["stages"][0], "lr": 0.02}]}
    with pytest.raises(TrainingFailed, match=r"^stage 1 \(s1\) cannot resume: its checkpoint was written for a "
                                             r"different stage configuration; start a new run instead\.$"):
        run_tiny(changed, resume=True)
    with pytest.raises(TrainingFailed, match=r"sample order differs \(seed 0 \(now 7\)\)"):
        run_tiny({**raw, "seed": 7}, resume=True)
    payload = load_checkpoint(last)
    classes, payload["class_names"] = payload["class_names"], payload["class_names"][:-1] + ["emu"]
    save_checkpoint(last, payload)  # as if a class folder had been swapped since the stop
    with pytest.raises(TrainingFailed, match=rf"classes changed since the checkpoint \({len(classes)} -> "
                                             rf"{len(classes)} classes; added {classes[-1]}; removed emu\); put the "):
        run_tiny(raw, resume=True)
    assert RunStore().get_run("tiny")["state"] == "failed"
    payload["class_names"] = classes
    save_checkpoint(last, payload)
    extra = next(tmp_path.glob("caltech101/101_ObjectCategories/*/image_0001.jpg"))
    trained = sum(class_counts("caltech101", tmp_path, "train").values())
    for number in range(1000, 1100):  # an image added to the data set since the stop, one the split trains on
        added = extra.with_name(f"image_{number}.jpg")
        shutil.copy(extra, added)
        if sum(class_counts("caltech101", tmp_path, "train").values()) > trained:
            break
        added.unlink()
    with pytest.raises(TrainingFailed, match=r"its training images changed since the checkpoint \(\d+ then, \d+ "
                                             r"now: images were added or removed\); put them back as they were and "
                                             r"resume, or start a new run\.$"):
        run_tiny(raw, resume=True)
    added.unlink()
    original, renamed = rename_a_training_image(tmp_path)
    with pytest.raises(TrainingFailed, match=r"its training images changed since the checkpoint \(as many as then, "
                                             r"but images were renamed, replaced or moved to another class\); put "
                                             r"them back as they were and resume, or start a new run\.$"):
        run_tiny(raw, resume=True)
    renamed.rename(original)  # ... as the advice says: put back, the run resumes
    assert run_tiny(raw, resume=True) == "finished"


def test_the_resume_command_names_the_nodes_of_a_multi_node_run(monkeypatch):
    assert engine.resume_command("r", 1) == "python -m train resume r"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes on this node of 8 in all
    assert engine.this_resume_command("r", ddp.Dist(0, 8, torch.device("cpu"))) == (
        "torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m train resume r")
    assert engine.this_resume_command("r", ddp.Dist(0, 4, torch.device("cpu"))) == (
        "torchrun --nproc_per_node=4 -m train resume r")  # one node
    assert engine.resume_command("r", 6) == "torchrun --nproc_per_node=6 -m train resume r"  # another run's count


def test_a_resume_with_another_number_of_processes_says_how_and_keeps_the_run_resumable(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, epochs=(2,))
    real_after = Trainer._after_step
    monkeypatch.setattr(Trainer, "_after_step", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    assert run_tiny(raw) == "stopped"
    monkeypatch.setattr(Trainer, "_after_step", real_after)
    last = paths.run_dir("tiny") / "stage1-s1" / "last.pt"
    payload = load_checkpoint(last)
    payload["sampler"] = {**payload["sampler"], "world": 2}  # as if checkpointed under torchrun with 2 processes
    save_checkpoint(last, payload)
    with pytest.raises(engine.ResumeRefused, match=r"^stage 1 \(s1\) was checkpointed by 2 training processes and "
                                                   r"this resume has 1: .* resume it with 2 \(torchrun "
                                                   r"--nproc_per_node=2 -m train resume tiny\)\.$"):
        run_tiny(raw, resume=True)
    from train import jobs

    with pytest.raises(RunStoreError, match=r"was checkpointed by 2 training processes and this resume has 1"):
        jobs.resume("tiny")  # the app's Resume (one process) refuses before queueing anything
    run = RunStore().get_run("tiny")
    assert (run["state"], run["error"]) == ("stopped", None)  # not failed: resumed rightly, it goes on


@pytest.mark.parametrize("select, flat_key", [("accuracy", "accuracy"), ("balanced", "balanced_acc")])
def test_early_stopping_ends_a_stage_without_gain_and_resume_moves_on(tmp_path, monkeypatch, select, flat_key):
    real = engine.evaluation.class_result

    rising = iter([0.1, 0.2, 0.3, 0.4, 0.5])

    def flat(*args, **kwargs):  # the selected validation metric never improves; the other one always does
        other = "balanced_acc" if flat_key == "accuracy" else "accuracy"
        return {**real(*args, **kwargs), flat_key: 0.5, other: next(rising)}

    monkeypatch.setattr(engine.evaluation, "class_result", flat)
    raw = tiny_config(tmp_path, epochs=(4, 1))
    raw["stages"][0].update(patience=2, select=select)
    assert run_tiny(raw) == "finished"
    store = RunStore()
    assert [(m["stage"], m["epoch"]) for m in store.metrics("tiny", "epoch")] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    last = load_checkpoint(paths.run_dir("tiny") / "stage1-s1" / "last.pt")
    assert last["stopped_early"] and last["epoch"] == 3 and "optimizer" not in last
    assert engine.find_resume_point(parse_config(raw), "tiny").stage == 2
    assert store.stages("tiny")[0]["completed_epochs"] == 3


def test_early_stopping_state_saved_before_select_counts_the_selected_metric_anew():
    from types import SimpleNamespace

    def restored(early, select):
        st = SimpleNamespace(stage=SimpleNamespace(select=select), best=0.8, totals=[0.0, 0.0, 0.0], last_lr=None,
                             _load_restored=lambda: None)
        engine._StageState.load_trainer_state(st, {"early_stopping": early})
        return st.best_selected, st.stale_epochs

    older = {"best": 0.3, "stale": 2}  # an older ResLens counted balanced accuracy, whatever picked best.pt
    assert restored(older, "balanced") == (0.3, 2)
    assert restored(older, "accuracy") == (0.8, 0)  # from the best accuracy so far (best.pt's), patience anew
    assert restored({**older, "select": "accuracy"}, "accuracy") == (0.3, 2)


@pytest.mark.parametrize("select, best_epoch", [("accuracy", 3), ("balanced", 2)])
def test_best_pt_is_the_epoch_with_the_best_selected_metric(tmp_path, monkeypatch, select, best_epoch):
    real = engine.evaluation.class_result
    scores = iter([(0.4, 0.3), (0.5, 0.7), (0.9, 0.4)])  # (accuracy, balanced accuracy) of epochs 1, 2, 3

    def scripted(*args, **kwargs):
        accuracy, balanced = next(scores)
        return {**real(*args, **kwargs), "accuracy": accuracy, "balanced_acc": balanced}

    monkeypatch.setattr(engine.evaluation, "class_result", scripted)
    raw = tiny_config(tmp_path, epochs=(3,), select=select)
    assert run_tiny(raw) == "finished"
    stage = RunStore().stages("tiny")[0]
    assert stage["best_epoch"] == best_epoch and stage["best_val_acc"] == {3: 0.9, 2: 0.5}[best_epoch]
    assert load_checkpoint(paths.run_dir("tiny") / "stage1-s1" / "best.pt")["epoch"] == best_epoch


def test_retention_final_keeps_only_the_last_stages_checkpoints(tmp_path):
    raw = {**tiny_config(tmp_path, epochs=(1, 1)), "retention": "final"}
    assert run_tiny(raw) == "finished"
    run = paths.run_dir("tiny")
    assert not list((run / "stage1-s1").glob("*.pt"))
    assert sorted(p.name for p in (run / "stage2-s2").glob("*.pt")) == ["best.pt", "last.pt"]
    first = RunStore().stages("tiny")[0]
    assert first["best_path"] is None and first["last_path"] is None and first["best_val_acc"] is not None


def test_resume_point_skips_finished_stages(tmp_path):
    raw = tiny_config(tmp_path, epochs=(1, 1))
    run_tiny(raw)
    config = parse_config(raw)
    assert engine.find_resume_point(config, "tiny").stage == 2
    (paths.run_dir("tiny") / "stage2-s2" / "last.pt").unlink()
    point = engine.find_resume_point(config, "tiny")
    assert point.stage == 1 and point.checkpoint is None


def test_lr_schedule_warmup_then_cosine():
    stage = parse_config({"stages": [{"dataset": "shapes", "epochs": 4, "warmup_epochs": 1}]}).stages[0]
    f = lr_lambda(stage, steps_per_epoch=10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(39) < 0.01
    assert all(f(s) >= f(s + 1) for s in range(10, 39))
    step = parse_config({"stages": [{"dataset": "shapes", "epochs": 4, "warmup_epochs": 0,
                                     "schedule": "step"}]}).stages[0]
    g = lr_lambda(step, 10)
    assert (g(0), g(25), g(35)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))


def test_class_weights():
    assert class_weights([10, 10], "none", 0.9) is None
    inv = class_weights([90, 10], "weighted_loss", 0.9)
    assert inv.sum().item() == pytest.approx(2) and inv[1] / inv[0] == pytest.approx(9)
    cb = class_weights([90, 10, 0], "class_balanced", 0.99)
    expected = (1 - 0.99) / (1 - 0.99 ** 10) / ((1 - 0.99) / (1 - 0.99 ** 90))
    assert cb[1] / cb[0] == pytest.approx(expected, rel=1e-5) and cb[2] == 0


def test_freezing_keeps_backbone_fixed():
    model = engine.build_model("resnet18", 3, "scratch")
    engine.set_trainable(model, engine.trainable_prefixes("all", head_only=True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    assert not model.bn1.training and model.fc.training
    engine.set_trainable(model, engine.trainable_prefixes("from:layer4", head_only=False))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"} and model.layer4[0].bn1.training


def test_sampler_shards_and_resumes_mid_epoch():
    a = ddp.ShardedSampler(10, seed=1, rank=0, world=2)
    b = ddp.ShardedSampler(10, seed=1, rank=1, world=2)
    for s in (a, b):
        s.set_epoch(3)
    assert sorted(list(a) + list(b)) == list(range(10))
    full = list(a)
    a.set_epoch(3, start=2)
    assert list(a) == full[2:] and len(a) == 3
    weighted = ddp.ShardedSampler(100, weights=[0.0] * 50 + [1.0] * 50)
    assert min(weighted) >= 50


def test_config_file_round_trip_into_a_run(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,)))
    config = load_config(path)
    assert math.isclose(config.stages[0].lr, 0.01) and config.stages[0].root == str(tmp_path.resolve())


class _FailsToCompile(torch.nn.Module):
    def forward(self, x):
        from torch._inductor.exc import InductorError

        raise InductorError(RuntimeError("CppCompileError: C++ compile error\nsee the log"), None)


def test_a_model_torch_compile_cannot_build_fails_the_run_in_one_sentence(tmp_path, monkeypatch):
    """A C++ toolchain that cannot build Inductor's kernels ended the run with Inductor's traceback."""
    monkeypatch.setattr(engine.torch, "compile", lambda module: _FailsToCompile())
    said = (r"^torch\.compile could not compile the model \(InductorError: .*CppCompileError: C\+\+ compile error\); "
            r"run it again with compile: false \(--set compile=false\)")
    with pytest.raises(UserError, match=said):
        run_tiny({**tiny_config(tmp_path, epochs=(1,)), "compile": True})
    run = RunStore().get_run("tiny")
    assert run["state"] == "failed" and run["error"].startswith("torch.compile could not compile the model")


def test_a_compiled_model_is_announced_until_its_first_step_ends(tmp_path, monkeypatch):
    """compile: true (auto means CUDA only): the progress phase says "compiling" (the Monitor page shows it) and
    the log says why the first step is slow; the phase clears once a step has run."""
    compiled = []
    monkeypatch.setattr(engine.torch, "compile", lambda module: compiled.append(module) or module)
    phases = []
    real_after = Trainer._after_step

    def after_step(self, st, epoch, loss, lr, images):
        phases.append(self.progress.phase)
        real_after(self, st, epoch, loss, lr, images)
        phases.append(self.progress.fields()["phase"])

    monkeypatch.setattr(Trainer, "_after_step", after_step)
    said = []
    monkeypatch.setattr(engine.Display, "message", lambda self, text: said.append(text))
    raw = {**tiny_config(tmp_path, epochs=(1,)), "compile": True}
    assert run_tiny(raw) == "finished"
    assert len(compiled) == 1
    assert phases[:4] == ["compiling", None, None, None]
    assert any("compiling the model (torch.compile)" in text for text in said)
    phases.clear()
    assert run_tiny({**raw, "compile": "auto"}, name="auto-on-cpu") == "finished"
    assert len(compiled) == 1 and set(phases) == {None}  # auto: not on a CPU


STEP_CODE = {"_train_steps", "_agree", "_after_step", "add_to_totals", "backward", "_run_epoch"}


def test_a_training_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    """Issue 10: no float(t), .item(), .tolist(), .cpu() or truth test of a tensor in the trainer's per-step code
    (on a GPU each one waits for the device); losses and totals reach the host when step rows are flushed."""
    import sys

    reads = []

    def watch(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith(str(Path("train") / "engine.py")):
                reads.append((caller.co_name, name))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("__float__", "__int__", "__bool__", "item", "tolist", "cpu", "numpy"):
        watch(name)
    assert run_tiny(tiny_config(tmp_path, epochs=(2,), label_smoothing=0.1)) == "finished"
    assert {function for function, _ in reads} & STEP_CODE == set(), reads
    assert ("_flush_steps", "tolist") not in reads and any(f == "host_floats" for f, _ in reads)


def test_a_share_of_one_image_at_32_px_is_refused_before_training():
    engine.check_shard("stage 1 (s1)", 2, 1, 32)
    engine.check_shard("stage 1 (s1)", 1, 2, 64)  # a 2x2 last feature map: BatchNorm has 4 values
    with pytest.raises(TrainingFailed, match=r"^stage 1 \(s1\) cannot train: each of the 2 training processes gets 1 "
                                             r"training image, a batch of 1, .* use fewer processes"):
        engine.check_shard("stage 1 (s1)", 1, 2, 32)
