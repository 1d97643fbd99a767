"""Pipeline configs (YAML): loading, command-line overrides and validation before anything runs.

A pipeline names a model, a seed, speed switches (``amp``: mixed precision where the device has
it, bf16 on CPUs with native bf16; ``channels_last``; ``compile``: ``torch.compile``) and a list of stages; every stage trains a fresh head on one data set,
starting from ``init`` (``scratch``, ``imagenet``, ``previous`` = the previous stage's best
checkpoint, or a checkpoint path). Every key but ``stages[*].dataset`` has a default
(``STAGE_DEFAULTS``, ``PIPELINE_DEFAULTS``).

Paths: a stage's ``root`` of ``null`` means the data root (``--data-root`` or ``RESLENS_DATA``);
a relative ``root`` or ``init`` path is resolved against the folder of the config file.

Overrides (``--set KEY=VALUE``, value parsed as YAML): ``arch=resnet18``, ``stages.2.epochs=3``
(stages numbered from 1, as in error messages), ``stages.finetune.lr=0.01`` (by name), or a stage
key without a prefix, e.g. ``epochs=2``, which applies to every stage.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from core import paths
from core.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "augment": ("none", "light", "strong"),
    "imbalance": ("none", "weighted_loss", "class_balanced", "weighted_sampler"),
    "mix": ("none", "mixup", "cutmix", "both"),
}
_TRAIN_LAYERS = re.compile(r"^(all|head|from:layer[1-4])$")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-4` as a string; read it as the number everybody means (as YAML 1.2 does)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(UserError):
    """A pipeline config that cannot run, explained in one sentence naming the stage and field."""


@dataclass
class StageConfig:
    """One stage of a pipeline (see the module docstring for paths)."""

    dataset: str
    name: str = ""
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 4
    batch_size: int = 64
    image_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    augment: str = "light"
    freeze_epochs: int = 0
    train_layers: str = "all"
    imbalance: str = "none"
    cb_beta: float = 0.999
    init: str = "scratch"
    num_workers: int = 0
    mix: str = "none"  # MixUp / CutMix of training batches ("both": one of the two per batch)
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of the mixing weight
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); validated and saved
    tta: bool = False  # validate on each image and its mirror image (logits averaged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PipelineConfig:
    """A validated pipeline: model, seed, stages, plus the file it came from."""

    stages: list[StageConfig]
    name: str = "run"
    arch: str = "resnet50"
    seed: int = 0
    compile: bool = False
    amp: bool = True
    channels_last: bool = True
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that ``parse_config`` turns back into the same config."""
        data = asdict(self)
        data.pop("source")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def stage_hash(self, index: int) -> str:
        """A short hash of what makes stage ``index``'s checkpoints compatible (arch + stage config)."""
        text = json.dumps({"arch": self.arch, "stage": self.stages[index].to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


STAGE_DEFAULTS = {f.name: f.default for f in fields(StageConfig) if f.name not in ("dataset", "options")}
PIPELINE_KEYS = {f.name for f in fields(PipelineConfig)} - {"source"}


def load_config(
    path: str | Path, overrides: Iterable[str] = (), data_root: str | Path | None = None, check_data: bool = True
) -> PipelineConfig:
    """Read, override and validate the YAML pipeline at ``path``; raise ``ConfigError`` on any problem."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {path} cannot be read ({type(exc).__name__}: {exc}).") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Config file {path} is not valid YAML{where}.") from None
    raw = apply_overrides(raw, overrides)
    config = parse_config(raw, base_dir=path.parent, data_root=data_root, check_data=check_data)
    config.source = str(path.resolve())
    return config


def parse_config(
    raw: Any, base_dir: str | Path | None = None, data_root: str | Path | None = None, check_data: bool = True
) -> PipelineConfig:
    """Validate a config dict (already overridden) and fill in defaults and resolved paths."""
    if not isinstance(raw, dict):
        raise ConfigError("The config must be a mapping with a 'stages' list.")
    _check_keys(raw, PIPELINE_KEYS, "the config")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("The config needs a non-empty 'stages' list.")
    top = {k: v for k, v in raw.items() if k != "stages"}
    config = PipelineConfig(stages=[], **top)
    _validate_pipeline(config)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for i, stage_raw in enumerate(stages_raw):
        config.stages.append(_parse_stage(i, stage_raw, base, data_root, check_data))
    _check_stage_names(config.stages)
    return config


def stage_label(index: int, stage: StageConfig | dict[str, Any] | None = None) -> str:
    """How messages name a stage: 'stage 2 (finetune)' (numbered from 1)."""
    name = stage.name if isinstance(stage, StageConfig) else (stage or {}).get("name")
    return f"stage {index + 1} ({name})" if name else f"stage {index + 1}"


def _parse_stage(i: int, raw: Any, base: Path, data_root: str | Path | None, check_data: bool) -> StageConfig:
    label = stage_label(i, raw if isinstance(raw, dict) else None)
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: each stage must be a mapping of keys, got {type(raw).__name__}.")
    _check_keys(raw, {f.name for f in fields(StageConfig)}, label)
    if "dataset" not in raw:
        raise ConfigError(f"{label}: 'dataset' is required.")
    values = {**raw}
    values.setdefault("name", f"stage{i + 1}")
    if values.get("options") is None:
        values["options"] = {}
    stage = StageConfig(**values)
    _validate_stage(i, stage, label)
    _resolve_paths(i, stage, label, base, data_root, check_data)
    return stage


def _check_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}.")


def _validate_pipeline(config: PipelineConfig) -> None:
    try:
        paths.safe_name(str(config.name))
    except ValueError as exc:
        raise ConfigError(f"the config: name: {exc}") from None
    if config.arch not in ARCHS:
        raise ConfigError(f"the config: arch must be one of {', '.join(ARCHS)}, got {config.arch!r}.")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ConfigError(f"the config: seed must be an integer, got {config.seed!r}.")
    for key in ("compile", "amp", "channels_last"):
        if not isinstance(getattr(config, key), bool):
            raise ConfigError(f"the config: {key} must be true or false, got {getattr(config, key)!r}.")


def _number(label: str, key: str, value: Any, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{label}: {key} must be {kind}, got {value!r}.")
    return value


def _validate_stage(i: int, s: StageConfig, label: str) -> None:
    ranges = {  # key: (low, low inclusive, high, high inclusive, integer)
        "epochs": (1, True, None, False, True),
        "batch_size": (1, True, None, False, True),
        "image_size": (16, True, 1024, True, True),
        "lr": (0, False, None, False, False),
        "momentum": (0, True, 1, False, False),
        "weight_decay": (0, True, None, False, False),
        "warmup_epochs": (0, True, None, False, False),
        "label_smoothing": (0, True, 1, False, False),
        "freeze_epochs": (0, True, None, False, True),
        "cb_beta": (0, True, 1, False, False),
        "num_workers": (0, True, 64, True, True),
        "mix_alpha": (0, False, None, False, False),
        "ema": (0, True, 1, False, False),
    }
    for key, (low, low_inc, high, high_inc, integer) in ranges.items():
        value = _number(label, key, getattr(s, key), integer)
        if value < low or (value == low and not low_inc):
            raise ConfigError(f"{label}: {key} must be {'>=' if low_inc else '>'} {low}, got {value!r}.")
        if high is not None and (value > high or (value == high and not high_inc)):
            raise ConfigError(f"{label}: {key} must be {'<=' if high_inc else '<'} {high}, got {value!r}.")
    for key, allowed in CHOICES.items():
        if getattr(s, key) not in allowed:
            raise ConfigError(f"{label}: {key} must be one of {', '.join(allowed)}, got {getattr(s, key)!r}.")
    if not isinstance(s.tta, bool):
        raise ConfigError(f"{label}: tta must be true or false, got {s.tta!r}.")
    if not isinstance(s.train_layers, str) or not _TRAIN_LAYERS.match(s.train_layers):
        raise ConfigError(f"{label}: train_layers must be all, head or from:layer1..4, got {s.train_layers!r}.")
    if s.warmup_epochs > s.epochs:
        raise ConfigError(f"{label}: warmup_epochs ({s.warmup_epochs}) cannot exceed epochs ({s.epochs}).")
    if not isinstance(s.options, dict):
        raise ConfigError(f"{label}: options must be a mapping, got {s.options!r}.")
    if not isinstance(s.init, str) or not s.init:
        raise ConfigError(f"{label}: init must be scratch, imagenet, previous or a checkpoint path.")
    if s.init == "previous" and i == 0:
        raise ConfigError(f"{label}: init 'previous' needs an earlier stage; use scratch, imagenet or a path.")
    _check_dataset(label, s.dataset)
    _check_options(label, s)


def _check_dataset(label: str, name: Any) -> None:
    from core.datasets import DATASETS

    if name not in DATASETS:
        raise ConfigError(f"{label}: unknown dataset {name!r}; known data sets are {', '.join(sorted(DATASETS))}.")


def _check_options(label: str, s: StageConfig) -> None:
    from core.datasets import DATASETS

    accepted = DATASETS[s.dataset].options
    unknown = sorted(set(s.options) - set(accepted))
    if unknown:
        names = ", ".join(accepted) or "none"
        raise ConfigError(f"{label}: data set {s.dataset} has no option {unknown[0]!r} (its options: {names}).")


def _check_data_present(label: str, s: StageConfig) -> None:
    from core.datasets import DATASETS, DatasetMissing, class_counts

    if DATASETS[s.dataset].folder is None:
        return
    if not Path(str(s.root)).is_dir():
        raise ConfigError(f"{label}: root {s.root} does not exist; download {s.dataset} there or set root.")
    try:
        class_counts(s.dataset, s.root, "train", **s.options)
    except DatasetMissing as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _resolve_paths(
    i: int, s: StageConfig, label: str, base: Path, data_root: str | Path | None, check_data: bool
) -> None:
    if s.root is None:
        s.root = str(Path(data_root).resolve() if data_root is not None else paths.data_root())
    else:
        s.root = str((base / Path(s.root).expanduser()).resolve())
    if check_data:
        _check_data_present(label, s)
    if s.init not in ("scratch", "imagenet", "previous"):
        init = (base / Path(s.init).expanduser()).resolve()
        if check_data and not init.is_file():
            raise ConfigError(f"{label}: init checkpoint {init} does not exist.")
        s.init = str(init)


def _check_stage_names(stages: list[StageConfig]) -> None:
    seen: set[str] = set()
    for i, s in enumerate(stages):
        try:
            paths.safe_name(str(s.name))
        except ValueError:
            raise ConfigError(f"{stage_label(i)}: name {s.name!r} must be letters, digits, '.', '_' or '-'.") from None
        if s.name in seen:
            raise ConfigError(f"{stage_label(i, s)}: name {s.name!r} is used by an earlier stage.")
        seen.add(s.name)


# ------------------------------------------------------------------ overrides
def apply_overrides(raw: Any, overrides: Iterable[str]) -> Any:
    """Return a copy of ``raw`` with every ``KEY=VALUE`` override applied (see module docstring)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} must look like KEY=VALUE, e.g. stages.2.epochs=3.")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"Override {item!r}: the value is not valid YAML.") from None
        _apply_one(raw, key.strip(), value, item)
    return raw


def _apply_one(raw: Any, key: str, value: Any, item: str) -> None:
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise ConfigError(f"Override {item!r}: the config has no 'stages' list to override.")
    parts = key.split(".")
    if parts[0] == "stages":
        if len(parts) < 3:
            raise ConfigError(f"Override {item!r}: use stages.<number or name>.<key>=VALUE.")
        targets = [_find_stage(raw["stages"], parts[1], item)]
        parts = parts[2:]
    elif parts[0] in PIPELINE_KEYS:
        targets = [raw]
    elif parts[0] in STAGE_DEFAULTS or parts[0] in ("dataset", "options"):
        targets = [s for s in raw["stages"] if isinstance(s, dict)]
    else:
        raise ConfigError(f"Override {item!r}: unknown key {parts[0]!r}.")
    for target in targets:
        _set_path(target, parts, value)


def _find_stage(stages: list[Any], ref: str, item: str) -> dict[str, Any]:
    if ref.isdigit():
        if not 1 <= int(ref) <= len(stages):
            raise ConfigError(f"Override {item!r}: stages are numbered 1 to {len(stages)}.")
        return stages[int(ref) - 1]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == ref:
            return stage
    raise ConfigError(f"Override {item!r}: there is no stage named {ref!r}.")


def _set_path(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value
