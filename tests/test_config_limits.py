"""Issue 11: odd config inputs are one-sentence ConfigErrors before any run row or folder exists."""
from __future__ import annotations

import pytest

from core import paths
from core.run_store import RunStore
from train.cli import main
from train.config import ConfigError, load_config, parse_config, parse_yaml

SHAPES = {"dataset": "shapes"}


@pytest.mark.parametrize("raw, message", [
    ({"name": "abc\n", "stages": [SHAPES]}, "the config: name: Run name 'abc\\n' is not allowed"),
    ({"stages": [{**SHAPES, "lr": float("nan")}]}, "stage 1: lr must be a finite number, got nan"),
    ({"stages": [{**SHAPES, "warmup_epochs": float("nan")}]}, "stage 1: warmup_epochs must be a finite number"),
    ({"stages": [{**SHAPES, "lr": float("inf")}]}, "stage 1: lr must be a finite number, got inf"),
    ({"stages": [{**SHAPES, "epochs": 10**30}]}, "stage 1: epochs must be <= 100000"),
    ({"seed": 10**23, "stages": [SHAPES]}, "the config: seed must be between 0 and 2147483647"),
    ({"stages": [{"dataset": ["shapes"]}]}, "stage 1: dataset must be the name of one data set, got ['shapes']"),
    ({"stages": [{**SHAPES, "name": "s1\n"}]}, "stage 1: name 's1\\n' must be letters"),
    ({"stages": [{**SHAPES, "train_layers": "head\n"}]}, "stage 1: train_layers must be"),
    ({"stages": [{"dataset": "caltech101", "options": {"val_fraction": [0.5]}}]},
     "stage 1: options.val_fraction must be a number, got [0.5]"),
    ({"stages": [{"dataset": "caltech101", "options": {"val_fraction": 1.5}}]},
     "stage 1: val_fraction must be between 0 and 1"),
    ({"stages": [{**SHAPES, "options": {"seed": {"a": 1}}}]}, "stage 1: options.seed must be an integer"),
    ({"stages": [{**SHAPES, "options": {"skip_unreadable": "yes"}}]},
     "stage 1: options.skip_unreadable must be true or false, got 'yes'"),
])
def test_bad_values_are_one_sentence(raw, message, tmp_path):
    if raw["stages"][0]["dataset"] == "caltech101":
        (tmp_path / "caltech101" / "101_ObjectCategories" / "a").mkdir(parents=True)
        (tmp_path / "caltech101" / "101_ObjectCategories" / "a" / "image_0001.jpg").write_bytes(b"")
        raw["stages"][0]["root"] = str(tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value).replace("\\n", "")


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
) + "stages: [{dataset: shapes}]\n"


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "expands to more than"),
    ("stages: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    ("stages:\n" + "".join("  " * i + "- \n" for i in range(3000)), "nested more than"),
])
def test_yaml_bombs_are_refused_before_anything_is_written(text, message, tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert main(["run", str(path), "--run-name", "bomb", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Config file") and message in err and err.count("\n") == 1
    assert not RunStore().has_run("bomb") and not paths.run_dir("bomb").exists()


def test_a_few_aliases_are_still_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("stages:\n  - &s {dataset: shapes, epochs: 2, name: a}\n  - {<<: *s, name: b}\n")
    assert [(s.name, s.epochs) for s in load_config(path).stages] == [("a", 2), ("b", 2)]


@pytest.mark.parametrize("override", ["lr=.nan", "epochs=1000000000000000000000000000000", "seed=100000000000000000000000",
                                      "warmup_epochs=.nan", "dataset=[shapes]"])
def test_cli_refuses_before_any_run_row_exists(override, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stages: [{dataset: shapes}]\n")
    assert main(["run", str(path), "--run-name", "odd", "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not RunStore().has_run("odd") and not paths.run_dir("odd").exists()


def test_a_key_given_twice_is_refused_with_its_line_but_merged_defaults_may_be_overridden(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("stages:\n  - dataset: shapes\n    epochs: 1\n    lr: 0.1\n    epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"^Config file {path} was refused: line 5: key 'epochs' is given twice\.$"):
        load_config(path)
    merged = parse_yaml("base: &b {epochs: 1, lr: 0.1}\nstage: {<<: *b, epochs: 3}\n")
    assert merged["stage"] == {"epochs": 3, "lr": 0.1}
