"""`python -m train run|resume|list|export|eval` through the real CLI dispatcher (in process)."""
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from core import paths
from core.run_store import RunStore
from tests.data_fixtures import make_caltech101
from tests.test_engine import one_thread, tiny_config, write_config  # noqa: F401
from train.cli import main


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished one-stage run 'tiny' made by `python -m train run` (2 epochs of 3 steps)."""
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,)))
    assert main(["run", str(path), "--epochs", "2", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    return path


def test_run_list_and_export(finished, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "STATE", "STAGE", "EPOCH", "BEST", "ACC"]
    name, state, stage, stage_name, epoch, best = lines[1].split()
    assert (name, state, stage, stage_name, epoch) == ("tiny", "finished", "1/1", "s1", "2/2")
    assert 0.0 <= float(best) <= 1.0

    assert main(["export", "tiny", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["stage"] for r in epochs] == [1, 1]  # from 1
    assert {"train_loss", "val_loss", "val_acc", "val_balanced_acc", "lr", "step"} <= set(epochs[0])
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all("val_acc" not in r for r in rows if r["kind"] == "step")

    assert main(["export", "tiny", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == len(rows) and table[0]["stage_name"] == "s1"


def test_run_names_every_stage_that_cannot_start_at_once(tmp_path, capsys, monkeypatch):
    """One refusal per attempt: a user downloaded CIFAR-100, then learnt that Caltech-256 was missing too."""
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    raw = tiny_config(tmp_path, epochs=(1, 1, 1), init="previous")
    raw["stages"][0]["init"] = "imagenet"
    raw["stages"][1]["dataset"], raw["stages"][2]["dataset"] = "cifar100", "caltech256"
    assert main(["run", str(write_config(tmp_path, raw)), "--quiet"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: 3 stages cannot start:"
    assert [line.split(":")[0] for line in lines[1:]] == ["  stage 1 (s1)", "  stage 2 (s2)", "  stage 3 (s3)"]
    assert "ImageNet weights for resnet18 are not available" in lines[1] and "CIFAR-100" in lines[2] \
        and "Caltech-256" in lines[3]
    assert RunStore().list_runs() == []


def test_overrides_reach_the_run(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(3,)))
    assert main(["run", str(path), "--set", "stages.1.epochs=1", "--set", "batch_size=9", "--run-name", "o",
                 "--quiet"]) == 0
    run = RunStore().get_run("o")
    assert run["config"]["stages"][0]["epochs"] == 1 and run["config"]["stages"][0]["batch_size"] == 9
    assert [m["step"] for m in RunStore().metrics("o", "step")] == [1, 2]


def test_eval_prints_and_stores_per_class_results(finished, capsys):
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    assert main(["eval", str(best), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "balanced accuracy" in out
    for cls in ("ant", "bee", "cat"):
        assert cls in out
    (evaluation,) = RunStore().evaluations()
    assert evaluation["dataset"] == "caltech101" and evaluation["run"] == "tiny"
    assert sum(evaluation["data"]["val_counts"]) == 6


def test_eval_counts_the_train_images_a_skipping_run_learnt_from(tmp_path, capsys, monkeypatch):
    """A run with skip_unreadable left a broken train image out: eval's TRAIN column says what the run saw."""
    from core.datasets import open_dataset

    raw = tiny_config(tmp_path, epochs=(1,), options={"skip_unreadable": True})
    Path(open_dataset("caltech101", tmp_path, "train").source(0)).write_bytes(b"\xff\xd8\xff not a JPEG")  # an ant
    assert main(["run", str(write_config(tmp_path, raw)), "--quiet", "--device", "cpu"]) == 0
    trained = RunStore().class_results("tiny", 0)["train_counts"]
    assert trained == [5, 6, 6]  # ant lost one of its 6 train images
    best = str(paths.run_dir("tiny") / "stage1-s1" / "best.pt")
    assert main(["eval", best]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["eval", best, "--root", "."]) == 0  # a root typed relative names the same cached split
    assert [e["data"]["train_counts"] for e in RunStore().evaluations()] == [trained, trained]


def test_eval_table_lines_up_wide_and_long_class_names():
    """CJK names (two terminal cells a character), a combining accent and a name longer than the column."""
    import numpy as np
    import wcwidth

    from core.evaluation import class_result
    from train.commands import class_table

    classes = ["猫" * 20, "cafe\u0301", "x" * 40, "dog"]
    r = class_result(classes, np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 4]]), [10, 5, 7, 9])
    lines = class_table(r)
    assert len(lines) == 5 and len({wcwidth.width(line) for line in lines}) == 1, "\n".join(lines)
    assert lines[1].startswith("x" * 30 + " ") and "猫" * 15 + " " in "\n".join(lines)  # worst recall first


def test_eval_at_another_test_resolution_feeds_images_of_that_size(finished, capsys, monkeypatch):
    from core import evaluation

    shapes = []
    predict = evaluation.predict

    def recording(model, batches, *args, **kwargs):
        shapes.extend(tuple(images.shape[-2:]) for images, _ in batches)
        return predict(model, batches, *args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", recording)
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    assert main(["eval", str(best)]) == 0
    trained = shapes[0]
    shapes.clear()
    assert main(["eval", str(best), "--image-size", "40"]) == 0
    assert trained != (40, 40) and set(shapes) == {(40, 40)}
    assert "at 40 px" in capsys.readouterr().out
    assert [e["data"]["image_size"] for e in RunStore().evaluations()] == [40, trained[0]]  # newest first
    assert main(["eval", str(best), "--image-size", "8"]) == 2
    assert "--image-size must be between 16 and 1024" in capsys.readouterr().err
    for command in ("eval", "ood-thresholds"):  # both evaluate the checkpoint
        assert main([command, str(best), "--batch-size", "0"]) == 2
        assert "--batch-size must be at least 1, got 0." in capsys.readouterr().err


def test_eval_warns_when_the_split_it_draws_is_not_the_one_the_checkpoint_trained_on(finished, tmp_path, capsys):
    """Caltech's split is drawn from the files: with a validation image removed, a training image takes its place."""
    from core.datasets import open_dataset

    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    assert main(["eval", str(best)]) == 0
    assert "warning" not in capsys.readouterr().err  # the same images: nothing to say
    first = open_dataset("caltech101", tmp_path, "train").files[0]
    added = [first.with_name(f"image_{n}.jpg") for n in range(100, 106)]  # the class's split is drawn again
    for path in added:
        shutil.copy(first, path)
    assert main(["eval", str(best)]) == 0
    assert capsys.readouterr().err == (
        "warning: The images of caltech101 changed since this checkpoint was trained (added, removed, renamed or "
        "moved): the val split is no longer the one it was validated on and may hold images it trained on, so its "
        "figures may read high.\n")
    assert RunStore().evaluations()[0]["data"]["note"].startswith("The images of caltech101 changed")
    for path in added:
        path.unlink()
    for folder in (tmp_path / "caltech101" / "101_ObjectCategories").iterdir():  # one image a class: none to validate
        for extra in sorted(folder.iterdir())[1:]:
            extra.unlink()
    assert main(["eval", str(best)]) == 2
    assert capsys.readouterr().err == (f"error: The val split of caltech101 at {tmp_path} has no images: there is "
                                       "nothing to evaluate.\n")


def test_eval_on_other_images_counts_the_train_images_the_model_learnt_from(finished, tmp_path):
    """The TRAIN column (and the Classes page's class sizes) came from the evaluated folder's train split."""
    from core.checkpoints import load_checkpoint

    other = make_caltech101(tmp_path / "other", {"ant": 20, "bee": 4, "cat": 8})
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    assert main(["eval", str(best), "--root", str(other)]) == 0
    assert RunStore().evaluations()[0]["data"]["train_counts"] == load_checkpoint(best)["train_counts"] == [6, 6, 6]


def test_eval_of_a_checkpoint_whose_data_is_not_here_says_the_root_came_from_it(finished, tmp_path, capsys):
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    shutil.rmtree(tmp_path / "caltech101")  # as on another machine: the recorded root holds nothing
    assert main(["eval", str(best)]) == 2
    err = capsys.readouterr().err
    assert f"({tmp_path} is where the checkpoint was trained, as it records; pass --root to evaluate on the data " \
           "set elsewhere.)" in err and err.startswith("error: The Caltech-101 data set was not found")


def test_eval_refuses_a_data_set_with_other_classes(finished, tmp_path, capsys):
    other = make_caltech101(tmp_path / "other", {"x": 3, "y": 3})
    best = paths.run_dir("tiny") / "stage1-s1" / "best.pt"
    from train.image_cache import cache_entries

    cached = [e.path for e in cache_entries()]
    assert main(["eval", str(best), "--dataset", "caltech101", "--root", str(other)]) == 2
    assert "other classes than those expected here" in capsys.readouterr().err
    assert [e.path for e in cache_entries()] == cached  # refused before any image was decoded


@pytest.mark.parametrize("argv, message", [
    (["resume", "ghost"], "no run named 'ghost'"),
    (["export", "ghost"], "no run named 'ghost'"),
    (["eval", "/nonexistent/model.pt"], "does not exist"),
])
def test_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_config_and_bad_run_name_exit_cleanly(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,), lr=-0.1))
    assert main(["run", str(path)]) == 2
    assert "stage 1 (s1): lr must be > 0, got -0.1" in capsys.readouterr().err
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,)))
    assert main(["run", str(path), "--run-name", "../../outside"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert not (paths.runs_dir().parent.parent / "outside").exists()


def test_run_refuses_an_init_file_that_is_no_checkpoint_before_making_the_run(tmp_path, capsys):
    raw = tiny_config(tmp_path, epochs=(1,))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    raw["stages"][0]["init"] = str(tmp_path / "notes.pt")
    assert main(["run", str(write_config(tmp_path, raw)), "--quiet"]) == 2
    assert "stage 1 (s1): init checkpoint" in capsys.readouterr().err and RunStore().list_runs() == []


def test_resume_of_finished_run_is_refused(finished, capsys):
    assert main(["resume", "tiny"]) == 2
    assert "already finished" in capsys.readouterr().err


def test_list_shows_the_epochs_a_stopped_run_finished_and_the_one_a_running_run_is_in(capsys):
    store = RunStore()
    for name, state in (("stopped", "stopped"), ("live", "running")):
        store.create_run(name, {"name": name, "stages": [{"name": "s1"}]})
        store.upsert_stage(name, 0, "s1", "shapes", epochs=5)
        store.update_stage(name, 0, completed_epochs=2)
        store.heartbeat(name, stage=0, epoch=3)  # the third epoch was under way
        store.set_state(name, state, pid=os.getpid() if state == "running" else None)
    assert main(["list"]) == 0
    epochs = {line.split()[0]: line.split()[4] for line in capsys.readouterr().out.splitlines()[1:]}
    assert epochs == {"stopped": "2/5", "live": "3/5"}


def test_a_usage_error_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["list", "extra"])
    usage = capsys.readouterr().err
    assert exited.value.code == 2 and "unrecognized arguments: extra" in usage
    assert "{run,resume,list,export,eval,delete,data,explain,compare,lr-find,ood-thresholds,export-model,cache}" in \
        "".join(usage.split())
    for argv, message in ((["eval", "x.pt", "--top", "-1"], "argument --top: must be 0 or more, got -1"),
                          (["explain", "x.pt", "a.jpg", "--top-k", "0"], "argument --top-k: must be 1 or more, got 0"),
                          (["compare", "a", "b", "--top", "two"], "argument --top: 'two' is not a whole number")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_list_without_runs(capsys, tmp_path, monkeypatch):
    assert main(["list"]) == 0
    assert "No runs yet" in capsys.readouterr().out
    home = tmp_path / "mistyped"  # a listing never makes the folder it looks in
    monkeypatch.setenv("RESLENS_HOME", str(home))
    assert main(["list"]) == 0
    assert f"No runs yet in {home};" in capsys.readouterr().out and not home.exists()
    home.write_text("a file")
    assert main(["list"]) == 2
    assert "it is a file" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path, monkeypatch):
    """`python -m train data shapes --json | head`: the reader went away; exit 141 without a traceback."""
    class ClosedPipe(io.TextIOWrapper):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    target = open(tmp_path / "out", "wb")
    monkeypatch.setattr("sys.stdout", ClosedPipe(target))
    assert main(["data", "shapes", "--json"]) == 141


def test_delete_asks_and_reports_the_space_freed(finished, capsys, monkeypatch):
    folder = paths.run_dir("tiny")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["delete", "tiny"]) == 1 and folder.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["delete", "tiny", "tiny"]) == 0  # named twice: deleted once
    out = capsys.readouterr().out
    assert out.count("Deleted run tiny.") == 1 and f"Freed {size / 2**20:.1f} MiB." in out
    assert not folder.exists() and not RunStore().has_run("tiny")
    assert main(["delete", "tiny", "--yes"]) == 2  # unknown now: one sentence
    assert "There is no run named 'tiny'" in capsys.readouterr().err


def test_delete_of_several_runs_checks_them_all_before_deleting_any(finished, capsys):
    store = RunStore()
    store.create_run("quiet", {"name": "quiet", "stages": []})
    store.set_state("quiet", "running", pid=os.getpid())  # a live trainer that stopped reporting
    store._write("UPDATE runs SET heartbeat = 0 WHERE name = 'quiet'")
    assert main(["delete", "tiny", "quiet", "--yes"]) == 2
    assert f"Run 'quiet' has a live trainer that stopped reporting (pid {os.getpid()})" in capsys.readouterr().err
    assert store.has_run("tiny") and paths.run_dir("tiny").is_dir()  # nothing went
    store.set_state("quiet", "running", pid=os.getppid())  # reporting, another process: plainly running
    assert main(["resume", "quiet"]) == 2
    assert f"Run 'quiet' is still running (pid {os.getppid()}); stop it before resuming." in capsys.readouterr().err


def test_unwritable_outputs_a_closed_prompt_and_a_damaged_store_are_one_sentence(finished, tmp_path, capsys,
                                                                                  monkeypatch):
    missing = tmp_path / "no-such-folder" / "rows.csv"
    assert main(["export", "tiny", "-o", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory.\n"
    assert main(["export", "tiny", "--format", "json", "-o", str(tmp_path)]) == 2  # a folder, not a file
    assert capsys.readouterr().err == f"error: {tmp_path}: Is a directory.\n"

    def closed(prompt):
        raise EOFError

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", closed)  # Ctrl-D at the question
    assert main(["delete", "tiny"]) == 1 and RunStore().has_run("tiny")
    assert "Nothing deleted." in capsys.readouterr().out

    paths.store_path().unlink()
    for leftover in paths.store_path().parent.glob("reslens.sqlite-*"):
        leftover.unlink()  # the WAL files of the good store
    paths.store_path().write_bytes(b"this is not SQLite" * 100)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: The run store {paths.store_path()} cannot be used (file is not a database); "
                          "it is damaged or not a ResLens run store") and "Traceback" not in err


def test_lr_find_tests_the_stage_as_it_trains_or_says_why_not(tmp_path, capsys, monkeypatch):
    from core.checkpoints import save_checkpoint
    from core.models import Preprocessing, build_model
    from train import recipe
    from train.config import load_config
    from train.lr_find import lr_range_test

    losses = []
    real_loss = recipe.training_loss
    monkeypatch.setattr(recipe, "training_loss", lambda w, ls: losses.append((w, ls)) or real_loss(w, ls))
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1, 1), imbalance="weighted_loss",
                                              label_smoothing=0.1))
    result = lr_range_test(load_config(path), 1, steps=4, start=1e-4, end=1.0, device="cpu")
    assert result.caveat.startswith("stage 2 starts from the previous stage's weights, which this test does not have")
    weight, smoothing = losses[-1]
    assert smoothing == 0.1 and weight is not None and len(weight) == 3  # the stage's own class weights
    source = build_model("resnet18", 3)
    best = save_checkpoint(tmp_path / "best.pt", {
        "arch": "resnet18", "num_classes": 3, "class_names": ["ant", "bee", "cat"],
        "preprocessing": Preprocessing.for_size(32).to_dict(), "model": source.state_dict()})
    built = []
    monkeypatch.setattr("core.models.build_model", lambda *a: built.append(a[2]) or build_model(*a))
    assert lr_range_test(load_config(path), 1, steps=4, start=1e-4, end=1.0, device="cpu", init=str(best)).caveat \
        is None
    assert built == [str(best)]


def test_lr_find_trains_only_the_layers_the_stage_trains_and_reads_only_its_own_data(tmp_path, capsys, monkeypatch):
    """A head-only stage's range test tuned every layer (BatchNorm statistics too); a missing data set of another
    stage refused it."""
    from core.models import build_model
    from train.config import load_config
    from train.lr_find import lr_range_test

    built = []  # (the model, its weights as built)

    def build(*args):
        model = build_model(*args)
        built.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr("core.models.build_model", build)
    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,), train_layers="from:layer4"))
    lr_range_test(load_config(path), steps=4, start=1e-4, end=1e-1, device="cpu")
    (model, before), = built
    changed = {name.split(".")[0] for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == {"layer4", "fc"}
    raw = tiny_config(tmp_path, epochs=(1, 1))
    raw["stages"][1] = {**raw["stages"][1], "dataset": "cifar100", "init": "scratch"}  # no CIFAR-100 here
    other = write_config(tmp_path, raw)
    assert main(["lr-find", str(other), "--stage", "1", "--steps", "3"]) in (0, 1)
    assert main(["lr-find", str(other), "--stage", "2", "--steps", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: stage 2 (s2): The CIFAR-100 data set was not found")


def test_lr_find_sweeps_and_suggests(tmp_path, capsys):
    from train.config import load_config
    from train.lr_find import lr_range_test, suggest

    path = write_config(tmp_path, tiny_config(tmp_path, epochs=(1,)))
    result = lr_range_test(load_config(path), steps=8, start=1e-4, end=1.0, device="cpu")
    assert 3 <= len(result.lrs) == len(result.losses) <= 8
    assert result.lrs[0] == pytest.approx(1e-4) and result.lrs == sorted(result.lrs)
    again = lr_range_test(load_config(path), steps=8, start=1e-4, end=1.0, device="cpu")  # the image cache built now
    assert again.losses == result.losses  # the same seed gives the same test, whether the cache was built or found
    assert main(["lr-find", str(path), "--end", "inf"]) == 2
    assert main(["lr-find", str(path), "--steps", "1000000000"]) == 2
    assert "The range test takes 3 to 10000 steps, got 1000000000." in capsys.readouterr().err
    assert main(["lr-find", str(path), "--csv", str(tmp_path / "no" / "such" / "lr.csv")]) == 2
    assert main(["lr-find", str(path), "--csv", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--csv: folder" in err and f"--csv: {tmp_path} is a folder." in err
    csv_path = tmp_path / "lr.csv"
    code = main(["lr-find", str(path), "--steps", "6", "--start", "1e-4", "--end", "1", "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert code in (0, 1) and ("Suggested learning rate" in out) == (code == 0)
    assert csv_path.read_text().startswith("lr,loss\n")
    assert suggest([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.9, 1.0, 3.0]) == pytest.approx(1e-1)  # steepest fall
    assert suggest([1e-3, 1e-2, 1e-1], [1.0, 1.5, 2.0]) is None  # never falls
    assert main(["lr-find", str(path), "--stage", "2"]) == 2
    assert "--stage must be between 1 and 1" in capsys.readouterr().err


def test_help_names_every_command_with_a_whole_sentence():
    import importlib

    from train.cli import COMMAND_MODULES, build_parser, first_sentence

    assert first_sentence("List it (what, size); --clear deletes it, or the part\n    unused. Partial files go.") == \
        "List it (what, size); --clear deletes it, or the part unused."
    assert first_sentence("Train a pipeline, e.g. the demo, i.e. two stages. More.") == \
        "Train a pipeline, e.g. the demo, i.e. two stages."
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    commands = {module: list(importlib.import_module(module).COMMANDS) for module in COMMAND_MODULES}
    assert sorted(helps) == sorted(name for names in commands.values() for name in names)
    assert all(text and text.endswith(".") and "\n" not in text for text in helps.values()), helps
    for module, names in commands.items():  # read from the sources: the same as each imported command's
        own = next(a for a in build_parser(names[0])._actions if a.dest == "command")
        assert {c.dest: c.help for c in own._choices_actions} == helps


def test_a_command_imports_only_its_own_module(tmp_path):
    """`python -m train list` and `--help` start in a fraction of a second: neither torch nor the other commands
    are imported."""
    import subprocess
    import sys

    code = ("import sys; from train.cli import build_parser, main; status = main(['list']); build_parser(); "
            "print(status, 'torch' in sys.modules, 'train.explain_cmd' in sys.modules)")  # build_parser(): --help
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=paths.REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False False"


@pytest.mark.parametrize("argv", [["data", "caltech101", "--root", ""], ["eval", "x.pt", "--root", " "],
                                  ["ood-thresholds", "x.pt", "--root", ""], ["run", "x.yaml", "--data-root", ""],
                                  ["lr-find", "x.yaml", "--data-root", ""], ["explain", "x.pt", "a.jpg", "--out", ""],
                                  ["export-model", "x.pt", "--out", ""]])
def test_an_empty_folder_argument_is_refused_not_read_as_the_current_folder(argv, capsys):
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2 and "is empty; give a folder" in capsys.readouterr().err


def test_a_command_started_with_its_output_closed_does_its_work_quietly(tmp_path):
    """`python -m train list >&-`: Python then has no sys.stdout at all (it used to end in a traceback)."""
    import subprocess
    import sys

    done = subprocess.run(["bash", "-c", f"{sys.executable} -m train list >&-"], cwd=paths.REPO_ROOT,
                          env={**os.environ, "RESLENS_HOME": str(tmp_path / "home")}, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
