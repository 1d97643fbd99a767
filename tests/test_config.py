import os
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, apply_overrides, load_config, parse_config, stage_rows, stages_from_rows

REPO = Path(__file__).resolve().parent.parent


def two_stages(**finetune):
    return {
        "name": "demo",
        "arch": "resnet18",
        "stages": [
            {"name": "pretrain", "dataset": "shapes", "epochs": 2},
            {"name": "finetune", "dataset": "shapes-lt", "init": "previous", **finetune},
        ],
    }


def test_defaults_filled_in():
    config = parse_config(two_stages())
    ft = config.stages[1]
    assert (ft.epochs, ft.optimizer, ft.schedule, ft.imbalance, ft.init) == (4, "sgd", "cosine", "none", "previous")
    assert ft.root is not None and Path(ft.root).is_absolute()
    assert parse_config(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "finetune, message",
    [
        ({"lr": -0.1}, "stage 2 (finetune): lr must be > 0, got -0.1"),
        ({"epochs": 0}, "stage 2 (finetune): epochs must be >= 1, got 0"),
        ({"dataset": "imagenet22k"}, "stage 2 (finetune): unknown dataset 'imagenet22k'"),
        ({"optimizer": "lion"}, "stage 2 (finetune): optimizer must be one of sgd, adamw, got 'lion'"),
        ({"imbalance": "oversample"}, "stage 2 (finetune): imbalance must be one of"),
        ({"train_layers": "from:layer9"}, "stage 2 (finetune): train_layers must be"),
        ({"lerning_rate": 0.1}, "stage 2 (finetune): unknown key 'lerning_rate'"),
        ({"epochs": "many"}, "stage 2 (finetune): epochs must be an integer, got 'many'"),
        ({"name": "pretrain"}, "stage 2 (pretrain): name 'pretrain' is used by an earlier stage"),
        ({"init": "missing.pt"}, "stage 2 (finetune): init checkpoint"),
        ({"freeze_epochs": 9}, "stage 2 (finetune): freeze_epochs (9) cannot exceed epochs (4); for a short trial, "
                               "lower it as well (--set freeze_epochs=0)."),
        ({"batch_size": 1, "image_size": 32}, "stage 2 (finetune): batch_size 1 cannot train at 32 px"),
        ({"root": 5}, "stage 2 (finetune): root must be a folder path (text), got 5"),
        ({"root": ""}, "stage 2 (finetune): root is empty"),
        ({"root": "a\x00b"}, "stage 2 (finetune): root: Path 'a\\x00b' contains a NUL byte."),
        ({"init": "~nosuchuser/x.pt"}, "stage 2 (finetune): init: Path '~nosuchuser/x.pt' starts with a ~ that names"),
    ],
)
def test_bad_stage_values_get_one_sentence(finetune, message):
    with pytest.raises(ConfigError) as info:
        parse_config(two_stages(**finetune))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_an_init_that_is_a_folder_is_called_a_folder_not_missing(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(two_stages(init=str(tmp_path)))
    assert str(info.value) == f"stage 2 (finetune): init checkpoint {tmp_path} is a folder."


@pytest.mark.parametrize("finetune, field", [
    ({"lr": -0.1}, "lr"), ({"dataset": "imagenet22k"}, "dataset"), ({"lerning_rate": 0.1}, "lerning_rate"),
    ({"name": "pretrain"}, "name"), ({"init": "missing.pt"}, "init"), ({"warmup_epochs": 9}, "warmup_epochs"),
])
def test_config_errors_carry_the_stage_and_field(finetune, field):
    with pytest.raises(ConfigError) as info:
        parse_config(two_stages(**finetune))
    assert (info.value.stage, info.value.field) == (1, field)


def test_stage_table_rows_round_trip_and_keep_typed_values():
    stages = two_stages(lr=5e-4, options={"seed": 3})["stages"]
    assert parse_config({"stages": stages_from_rows(stage_rows(stages))}).to_dict()["stages"] == \
        parse_config({"stages": stages}).to_dict()["stages"]
    typed = stages_from_rows([{"dataset": "shapes", "epochs": "2.5", "lr": "1e-3", "batch_size": "4.0", "root": " "}])
    assert typed == [{"dataset": "shapes", "epochs": 2.5, "lr": 0.001, "batch_size": 4}]
    with pytest.raises(ConfigError) as info:
        stages_from_rows([{"dataset": "shapes"}, {"options": "{not json"}])
    assert (info.value.stage, info.value.field) == (1, "options")
    with pytest.raises(ConfigError, match=r"^stage 2: the row is empty; choose a data set or delete the row\.$"):
        stages_from_rows([{"dataset": "shapes"}, {"name": None, "epochs": ""}])


def test_missing_root_named(tmp_path):
    raw = {"stages": [{"name": "cal", "dataset": "caltech101", "root": str(tmp_path / "nowhere")}]}
    with pytest.raises(ConfigError, match=r"stage 1 \(cal\): root .*nowhere does not exist"):
        parse_config(raw)
    (tmp_path / "nowhere").write_text("a file")
    with pytest.raises(ConfigError, match=r"stage 1 \(cal\): root .*nowhere is a file, not a folder"):
        parse_config(raw)


def test_previous_init_needs_earlier_stage():
    with pytest.raises(ConfigError, match="stage 1: init 'previous' needs an earlier stage"):
        parse_config({"stages": [{"dataset": "shapes", "init": "previous"}]})


def test_top_level_checks():
    with pytest.raises(ConfigError, match="arch must be one of"):
        parse_config({**two_stages(), "arch": "vgg16"})
    with pytest.raises(ConfigError, match="non-empty 'stages'"):
        parse_config({"name": "x", "stages": []})
    with pytest.raises(ConfigError, match="unknown key 'stagez'"):
        parse_config({"stagez": []})
    with pytest.raises(ConfigError, match="amp must be true or false, got 'yes please'"):
        parse_config({**two_stages(), "amp": "yes please"})
    assert parse_config({**two_stages(), "channels_last": False}).channels_last is False
    with pytest.raises(ConfigError, match="data_path must be one of auto, workers, device, got 'gpu'"):
        parse_config({**two_stages(), "data_path": "gpu"})
    assert parse_config({**two_stages(), "data_path": "device"}).data_path == "device"


def test_overrides_by_number_name_and_for_all_stages():
    raw = apply_overrides(two_stages(), ["stages.2.epochs=3", "stages.pretrain.lr=0.05", "batch_size=8",
                                        "arch=resnet34", "stages.1.options.seed=3"])
    config = parse_config(raw)
    assert config.stages[1].epochs == 3 and config.stages[0].lr == 0.05
    assert [s.batch_size for s in config.stages] == [8, 8]
    assert config.arch == "resnet34" and config.stages[0].options == {"seed": 3}
    assert two_stages()["stages"][1].get("epochs") is None  # the input is not modified


def test_names_are_text_and_never_empty():
    for override, where in (("name", "the config"), ("stages.1.name", "stage 1")):
        with pytest.raises(ConfigError, match=f"^{where}: name is empty; give it a name"):
            parse_config(apply_overrides(two_stages(), [f"{override}="]))
        for value, shown in (("2024", "2024"), ("010", "8"), ("1.5", "1.5"), ("true", "True")):  # YAML's readings
            with pytest.raises(ConfigError, match=rf"^{where}: name {shown} must be text; quote it in YAML"):
                parse_config(apply_overrides(two_stages(), [f"{override}={value}"]))
    config = parse_config(apply_overrides(two_stages(), ["name='2024'", "stages.1.name='7'"]))
    assert config.name == "2024" and config.stages[0].name == "7"


@pytest.mark.parametrize("bad", ["epochs", "stages.3.epochs=1", "stages.nope.lr=1", "colour=red", "stages.1=2",
                                 "arch.x=1", "stages.1.epochs.x=2"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError, match="Override"):
        apply_overrides(two_stages(), [bad])


def test_an_override_fills_options_left_empty():
    raw = apply_overrides({"stages": [{"dataset": "shapes", "options": None}]}, ["stages.1.options.seed=3"])
    assert raw["stages"][0]["options"] == {"seed": 3}


def test_missing_dataset_under_existing_root(tmp_path):
    raw = {"stages": [{"name": "cal", "dataset": "caltech101", "root": str(tmp_path)}]}
    with pytest.raises(ConfigError, match=r"stage 1 \(cal\): The Caltech-101 data set was not found"):
        parse_config(raw)


def test_unknown_dataset_option():
    with pytest.raises(ConfigError, match="stage 1: data set shapes has no option 'colour'"):
        parse_config({"stages": [{"dataset": "shapes", "options": {"colour": 1}}]})


def test_load_config_resolves_relative_paths(tmp_path):
    for cls in ("ant", "bee"):
        folder = tmp_path / "data" / "caltech101" / "101_ObjectCategories" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"image_{i:04d}.jpg").write_bytes(b"")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(
        {"stages": [{"name": "c", "dataset": "caltech101", "root": "data"}]}))
    config = load_config(tmp_path / "p.yaml", overrides=["epochs=1"])
    assert config.stages[0].root == str((tmp_path / "data").resolve()) and config.stages[0].epochs == 1
    assert config.source == str((tmp_path / "p.yaml").resolve())


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n  - {")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["caltech101.yaml", "caltech256.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "train" / "configs" / name, check_data=False)
    assert config.arch == "resnet50"
    assert [s.dataset for s in config.stages][:2] == ["tinyimagenet", "cifar100"]
    assert [s.init for s in config.stages[1:]] == ["previous", "previous"]


def test_exponent_without_a_dot_is_a_number(tmp_path):
    from train.config import parse_yaml

    assert parse_yaml("lr: 5e-4\nwd: -2E3\nname: e5x\nn: 3") == {"lr": 5e-4, "wd": -2000.0, "name": "e5x", "n": 3}


def test_a_config_that_cannot_be_read_is_one_sentence(tmp_path):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"is a folder; give a pipeline YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not a text file \(not UTF-8\)"):
        load_config(bad)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(ConfigError, match=r"pipe.yaml is not a regular file"):
        load_config(fifo)


@pytest.mark.parametrize("value, device, expected", [("auto", "cuda", True), ("auto", "cpu", False),
                                                     (True, "cpu", True), (False, "cuda", False)])
def test_compile_auto_means_cuda_only(value, device, expected):
    from train.config import compiles

    assert parse_config({"compile": value, "stages": [{"dataset": "shapes"}]}).compile == value
    assert compiles(value, device) is expected


@pytest.mark.parametrize("value", [1, "yes", None])
def test_compile_takes_auto_true_or_false(value):
    with pytest.raises(ConfigError, match=r"^the config: compile must be auto, true or false, got "):
        parse_config({"compile": value, "stages": [{"dataset": "shapes"}]})


@pytest.mark.parametrize("second, message, field", [
    (7, "stage 2: each stage must be a mapping of keys, got int.", None),
    ({"name": "b"}, "stage 2 (b): 'dataset' is required.", "dataset"),
    ({"name": "b", "dataset": 3}, "stage 2 (b): dataset must be the name of one data set, got 3.", "dataset"),
    ({"name": "b", "dataset": "shapes", "options": {"seed": "x"}},
     "stage 2 (b): options.seed must be an integer, got 'x'.", "options.seed"),
    ({"name": "b", "dataset": "shapes", "options": {"nope": 1}},
     "stage 2 (b): data set shapes has no option 'nope' (its options: ", "options"),
    ({"name": "b", "dataset": "imagefolder"}, "stage 2 (b): root is required for dataset imagefolder: ", "root"),
    ({"name": "b", "dataset": "caltech101", "root": "/no/such/folder"},
     "stage 2 (b): root /no/such/folder does not exist; download caltech101 there or set root.", "root"),
])
def test_the_stage_is_named_once_for_every_kind_of_stage_error(second, message, field):
    with pytest.raises(ConfigError) as info:
        parse_config({"stages": [{"name": "a", "dataset": "shapes"}, second]})
    assert str(info.value).startswith(message)
    assert str(info.value).count("stage 2") == 1
    assert (info.value.stage, info.value.field) == (1, field)


def test_pipeline_and_table_errors_keep_their_own_place():
    with pytest.raises(ConfigError) as info:
        parse_config({"stages": [{"dataset": "shapes"}], "speed": 1})
    assert str(info.value).startswith("the config: unknown key 'speed'; allowed keys are ")
    assert (info.value.stage, info.value.field) == (None, None)
    with pytest.raises(ConfigError) as info:
        stages_from_rows([{"dataset": "shapes"}, {"name": "b", "dataset": "shapes", "epochs": "[1"}])
    assert str(info.value) == "stage 2: epochs '[1' cannot be read as a value."
    assert (info.value.stage, info.value.field) == (1, "epochs")
