"""Pipeline configs (YAML): loading, command-line overrides and validation before anything runs.

A pipeline names a model, a seed, speed switches (``amp``: mixed precision where the device has
it, bf16 on CPUs with native bf16; ``channels_last``; ``compile``: ``torch.compile``, ``auto`` = on CUDA only)
and a list of stages; every stage trains a fresh head on one data set, starting from ``init`` (``scratch``, ``imagenet``, ``previous`` = the previous stage's best
checkpoint, or a checkpoint path). Every key but ``stages[*].dataset`` has a default
(``STAGE_DEFAULTS``, ``PIPELINE_DEFAULTS``).

Paths: a stage's ``root`` of ``null`` means the data root (``--data-root`` or ``RESLENS_DATA``), except for
``imagefolder``, whose root is the image folder itself and must be given; a relative ``root`` or ``init``
path is resolved against the folder of the config file.

Overrides (``--set KEY=VALUE``, value parsed as YAML): ``arch=resnet18``, ``stages.2.epochs=3``
(stages numbered from 1, as in error messages), ``stages.finetune.lr=0.01`` (by name), or a stage
key without a prefix, e.g. ``epochs=2``, which applies to every stage.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
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
    "select": ("accuracy", "balanced"),
}
SELECTED_METRIC = {"accuracy": "val_acc", "balanced": "val_balanced_acc"}  # select -> the epoch metric it reads
RETENTION = ("all", "final")
DATA_PATHS = ("auto", "workers", "device")  # auto: device on CUDA, workers elsewhere (train/device_batches.py)
_TRAIN_LAYERS = re.compile(r"all|head|from:layer[1-4]")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-4` as a string; read it as the number everybody means (as YAML 1.2 does)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


MAX_YAML_DEPTH = 32  # nesting levels; a pipeline needs 4
MAX_YAML_NODES = 20_000  # values after every alias is expanded (billion laughs)
MAX_SEED = 2**31 - 1
NAMED_INITS = ("scratch", "imagenet", "previous")  # a stage's init: one of these, or a checkpoint's path
MAX_EPOCHS = 100_000


class YamlRefused(yaml.YAMLError):
    """A readable document refused for a reason said in words (its message)."""


class YamlTooComplex(YamlRefused):
    """A document nested too deeply or expanding (through aliases) into too many values."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are each given once: YAML would silently keep the last of ``epochs: 1 ... epochs: 3``."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue  # merged defaults may be overridden; other non-text keys are refused later
        key = loader.construct_object(key_node)
        if key in seen:
            raise YamlRefused(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def parse_yaml(text: str) -> Any:
    """Parse config text (SafeLoader, numbers as YAML 1.2 reads them) within depth and size limits."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    except ValueError as exc:  # a number of 5,000 digits, a date with month 13
        raise YamlRefused(f"a value cannot be read ({str(exc).split(':')[0]})") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Raise ``YamlTooComplex`` when ``root`` is deeper than the limit or expands to too many values."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise YamlTooComplex(f"it is nested more than {MAX_YAML_DEPTH} levels deep")
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_YAML_NODES + 1  # a node that contains itself never finishes expanding
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise YamlTooComplex(f"it expands to more than {MAX_YAML_NODES} values (too many aliases)")
        sizes[id(node)] = total
        return total

    size(root, 0)


def _compose_node_limited(self: Any, parent: Any, index: Any) -> Any:
    """PyYAML composes recursively: refuse deep nesting before Python's recursion limit is hit."""
    self._depth = getattr(self, "_depth", 0) + 1
    try:
        if self._depth > MAX_YAML_DEPTH:
            raise YamlTooComplex(f"it is nested more than {MAX_YAML_DEPTH} levels deep")
        return yaml.composer.Composer.compose_node(self, parent, index)
    finally:
        self._depth -= 1


_YamlLoader.compose_node = _compose_node_limited  # type: ignore[method-assign]


class ConfigError(UserError):
    """A pipeline config that cannot run, explained in one sentence naming the stage and field.

    ``stage`` (index from 0) and ``field`` (a stage key) say where the problem is when it is in a stage.
    """

    def __init__(self, message: str, stage: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.stage, self.field = stage, field

    def in_stage(self, index: int, label: str) -> ConfigError:
        """This error as one of stage ``index``: the message led by ``label`` (``stage 2 (finetune): ...``)."""
        return ConfigError(f"{label}: {self}", stage=index, field=self.field)


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
    select: str = "accuracy"  # which validation metric picks best.pt and drives patience: accuracy or balanced
    patience: int = 0  # early stopping: end the stage after this many epochs without a better selected metric
    mix: str = "none"  # MixUp / CutMix of training batches ("both": one of the two per batch)
    mix_alpha: float = 1.0  # Beta(alpha, alpha) of the mixing weight
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); validated and saved
    tta: bool = False  # validate on each image and its mirror image (logits averaged)
    train_size_start: int = 0  # resolution schedule: epoch 1 trains at this size, growing to image_size (0: off)
    train_size_ramp: float = 0.75  # ... over this fraction of the epochs; the rest train at image_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ramp_epochs(self) -> int:
        """How many epochs a resolution schedule's ramp spans, from ``train_size_start`` to ``image_size``."""
        return min(self.epochs, round(self.train_size_ramp * self.epochs))

    def train_size(self, epoch: int) -> int:
        """The training image size of ``epoch`` (from 0): ``image_size``, or on a resolution schedule a linear ramp
        from exactly ``train_size_start`` (epoch 0) to exactly ``image_size`` (the ramp's last epoch and every
        later one), the sizes in between rounded to a multiple of 8 (few distinct sizes: each is a new shape for
        cuDNN and ``torch.compile``). Validation is always at ``image_size``."""
        last = self.ramp_epochs() - 1
        if not self.train_size_start or epoch >= last:
            return self.image_size
        if epoch <= 0:
            return self.train_size_start
        size = 8 * round((self.train_size_start + epoch / last * (self.image_size - self.train_size_start)) / 8)
        return max(self.train_size_start, min(self.image_size, size))

    def same_as(self, stored: dict[str, Any]) -> bool:
        """Whether a stage config stored in an older checkpoint describes this stage: every key equal, where a key
        the older file does not have (added to ResLens since) counts as its default."""
        now = self.to_dict()
        return all(stored.get(key, STAGE_DEFAULTS.get(key)) == value for key, value in now.items()) \
            and set(stored) <= set(now)


@dataclass
class PipelineConfig:
    """A validated pipeline: model, seed, stages, plus the file it came from."""

    stages: list[StageConfig]
    name: str = "run"
    arch: str = "resnet50"
    seed: int = 0
    compile: bool | str = "auto"  # "auto": on CUDA (1.4x the eager steps on an H200, issue 10), off elsewhere
    amp: bool = True
    channels_last: bool = True
    retention: str = "all"  # all: keep every stage's checkpoints; final: once finished, only the last stage's
    data_path: str = "auto"  # workers: per-sample augmentation in DataLoader workers; device: batch-wise on the device
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

    def written_for(self, index: int, checkpoint: dict[str, Any]) -> bool:
        """Whether ``checkpoint`` was written for stage ``index`` as configured now: the same hash, or (a file
        from before a stage key was added, whose hash therefore differs) the same arch and stage config."""
        if checkpoint.get("config_hash") in (None, self.stage_hash(index)):
            return True
        stored = checkpoint.get("stage_config")
        return checkpoint.get("arch") == self.arch and isinstance(stored, dict) and self.stages[index].same_as(stored)


STAGE_DEFAULTS = {f.name: f.default for f in fields(StageConfig) if f.name not in ("dataset", "options")}
PIPELINE_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig) if f.name not in ("stages", "source")}
PIPELINE_KEYS = {f.name for f in fields(PipelineConfig)} - {"source"}


def load_config(
    path: str | Path, overrides: Iterable[str] = (), data_root: str | Path | None = None, check_data: bool = True
) -> PipelineConfig:
    """Read, override and validate the YAML pipeline at ``path``; raise ``ConfigError`` on any problem."""
    path = Path(path)
    try:
        if path.is_dir() or (path.exists() and not path.is_file()):  # a FIFO or device would block or never end
            raise ConfigError(f"Config file {path} is {'a folder' if path.is_dir() else 'not a regular file'}; give "
                              "a pipeline YAML file, e.g. train/configs/demo.yaml.")
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not a text file (not UTF-8); give a pipeline YAML file.") from None
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc.strerror or exc}).") from None
    except YamlRefused as exc:
        raise ConfigError(f"Config file {path} was refused: {exc}.") from None
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
    config = parse_settings(raw)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("The config needs a non-empty 'stages' list.")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for i, stage_raw in enumerate(stages_raw):
        try:
            config.stages.append(_parse_stage(i, stage_raw, base, data_root, check_data))
        except ConfigError as exc:  # the helpers say what is wrong; the stage is named here, once
            raise exc.in_stage(i, stage_label(i, stage_raw if isinstance(stage_raw, dict) else None)) from None
    _check_stage_names(config.stages)
    return config


def check_stage_keys(stages: list[Any]) -> None:
    """Every stage a mapping of known keys (what the stage table cannot show is refused, not dropped)."""
    for i, stage in enumerate(stages):
        try:
            _check_stage_shape(stage)
        except ConfigError as exc:
            raise exc.in_stage(i, stage_label(i, stage if isinstance(stage, dict) else None)) from None


def _check_stage_shape(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"each stage must be a mapping of keys, got {type(raw).__name__}.")
    _check_keys(raw, {f.name for f in fields(StageConfig)})


def parse_settings(raw: dict[str, Any]) -> PipelineConfig:
    """The pipeline's top-level settings (name, arch, seed, speed switches...) checked, with no stages yet."""
    try:
        _check_keys(raw, PIPELINE_KEYS)
    except ConfigError as exc:
        raise ConfigError(f"the config: {exc}") from None
    config = PipelineConfig(stages=[], **{k: v for k, v in raw.items() if k != "stages"})
    _validate_pipeline(config)
    return config


def stage_label(index: int, stage: StageConfig | dict[str, Any] | None = None) -> str:
    """How messages name a stage: 'stage 2 (finetune)' (numbered from 1)."""
    name = stage.name if isinstance(stage, StageConfig) else (stage or {}).get("name")
    return f"stage {index + 1} ({name})" if name else f"stage {index + 1}"


def _parse_stage(i: int, raw: Any, base: Path, data_root: str | Path | None, check_data: bool) -> StageConfig:
    """Stage ``i`` (its position: the default name, whether ``init: previous`` has a stage before it)."""
    _check_stage_shape(raw)
    if "dataset" not in raw:
        raise ConfigError("'dataset' is required.", field="dataset")
    values = {**raw}
    values.setdefault("name", f"stage{i + 1}")
    if values.get("options") is None:
        values["options"] = {}
    stage = StageConfig(**values)
    _validate_stage(stage, first=i == 0)
    _resolve_paths(stage, base, data_root, check_data)
    return stage


def _check_keys(raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}.",
                          field=unknown[0])


def _validate_pipeline(config: PipelineConfig) -> None:
    config.name = _name_text(config.name, "the config")
    try:
        paths.safe_name(config.name)
    except ValueError as exc:
        raise ConfigError(f"the config: name: {exc}") from None
    if config.arch not in ARCHS:
        raise ConfigError(f"the config: arch must be one of {', '.join(ARCHS)}, got {config.arch!r}.")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ConfigError(f"the config: seed must be an integer, got {config.seed!r}.")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"the config: seed must be between 0 and {MAX_SEED}, got {config.seed!r}.")
    for key in ("amp", "channels_last"):
        if not isinstance(getattr(config, key), bool):
            raise ConfigError(f"the config: {key} must be true or false, got {getattr(config, key)!r}.")
    if not (isinstance(config.compile, bool) or config.compile == "auto"):
        raise ConfigError(f"the config: compile must be auto, true or false, got {config.compile!r}.")
    if config.retention not in RETENTION:
        raise ConfigError(f"the config: retention must be one of {', '.join(RETENTION)}, got {config.retention!r}.")
    if config.data_path not in DATA_PATHS:
        raise ConfigError(f"the config: data_path must be one of {', '.join(DATA_PATHS)}, got {config.data_path!r}.")


def _number(key: str, value: Any, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}.", field=key)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}.", field=key)
    return value


MAX_BATCH_SIZE = 8192  # per process; larger batches do not fit any GPU at ResNet sizes


STAGE_RANGES = {  # key: (low, low inclusive, high, high inclusive, integer)
    "epochs": (1, True, MAX_EPOCHS, True, True),
    "batch_size": (1, True, MAX_BATCH_SIZE, True, True),
    "image_size": (16, True, 1024, True, True),
    "lr": (0, False, 1_000, True, False),
    "momentum": (0, True, 1, False, False),
    "weight_decay": (0, True, 1, True, False),
    "warmup_epochs": (0, True, MAX_EPOCHS, True, False),
    "label_smoothing": (0, True, 1, False, False),
    "freeze_epochs": (0, True, MAX_EPOCHS, True, True),
    "cb_beta": (0, True, 1, False, False),
    "num_workers": (0, True, 64, True, True),
    "patience": (0, True, None, False, True),
    "mix_alpha": (0.001, True, None, False, False),  # smaller underflows to 0 in float32 (Beta needs > 0)
    "ema": (0, True, 1, False, False),
    "train_size_start": (0, True, 1024, True, True),
    "train_size_ramp": (0, False, 1, True, False),
}


def _check_ranges(s: StageConfig) -> None:
    for key, (low, low_inc, high, high_inc, integer) in STAGE_RANGES.items():
        value = _number(key, getattr(s, key), integer)
        if value < low or (value == low and not low_inc):
            raise ConfigError(f"{key} must be {'>=' if low_inc else '>'} {low}, got {value!r}.", field=key)
        if high is not None and (value > high or (value == high and not high_inc)):
            raise ConfigError(f"{key} must be {'<=' if high_inc else '<'} {high}, got {value!r}.", field=key)


def _validate_stage(s: StageConfig, first: bool) -> None:
    """Values, ranges and choices of one stage (``first``: it is the pipeline's first stage)."""
    def fail(key: str, text: str) -> ConfigError:
        return ConfigError(text, field=key)

    _check_ranges(s)
    for key, allowed in CHOICES.items():
        if getattr(s, key) not in allowed:
            raise fail(key, f"{key} must be one of {', '.join(allowed)}, got {getattr(s, key)!r}.")
    if not isinstance(s.tta, bool):
        raise fail("tta", f"tta must be true or false, got {s.tta!r}.")
    if not isinstance(s.train_layers, str) or not _TRAIN_LAYERS.fullmatch(s.train_layers):
        raise fail("train_layers", f"train_layers must be all, head or from:layer1..4, got {s.train_layers!r}.")
    if s.train_size_start:
        _check_resolution_schedule(s)
    for key in ("warmup_epochs", "freeze_epochs"):
        if getattr(s, key) > s.epochs:
            raise fail(key, f"{key} ({getattr(s, key)}) cannot exceed epochs ({s.epochs}); for a short trial, lower "
                            f"it as well (--set {key}=0).")
    smallest = s.train_size_start or s.image_size
    if s.batch_size == 1 and smallest <= 32:
        raise fail("batch_size", f"batch_size 1 cannot train at {smallest} px: the last feature map is then 1x1, one "
                   "value per channel, which BatchNorm cannot normalise; use a batch of 2 or more, or 33 px or more.")
    if not isinstance(s.options, dict):
        raise fail("options", f"options must be a mapping, got {s.options!r}.")
    if s.root is not None and not isinstance(s.root, str):
        raise fail("root", f"root must be a folder path (text), got {s.root!r}.")
    if s.root is not None and not s.root.strip():
        raise fail("root", "root is empty; give a folder, or leave root out for the data root.")
    if not isinstance(s.init, str) or not s.init:
        raise fail("init", "init must be scratch, imagenet, previous or a checkpoint path.")
    if s.init == "previous" and first:
        raise fail("init", "init 'previous' needs an earlier stage; use scratch, imagenet or a path.")
    _check_dataset(s.dataset)
    _check_options(s)


def _check_resolution_schedule(s: StageConfig) -> None:
    if not 16 <= s.train_size_start <= s.image_size:
        raise ConfigError(f"train_size_start must be 0 (off) or from 16 to image_size ({s.image_size}), got "
                          f"{s.train_size_start}.", field="train_size_start")
    if s.ramp_epochs() < 2:
        raise ConfigError(f"a resolution schedule needs a ramp of at least 2 epochs; train_size_ramp "
                          f"{s.train_size_ramp:g} of {s.epochs} epoch(s) gives {s.ramp_epochs()}.",
                          field="train_size_ramp")
    if s.augment != "strong":
        raise ConfigError("train_size_start needs augment: strong (random resized crops, which show the same "
                          "content at any size).", field="train_size_start")


def _check_dataset(name: Any) -> None:
    from core.datasets import DATASETS

    if not isinstance(name, str):
        raise ConfigError(f"dataset must be the name of one data set, got {name!r}.", field="dataset")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known data sets are {', '.join(sorted(DATASETS))}.",
                          field="dataset")


def _check_options(s: StageConfig) -> None:
    from core.datasets import COMMON_OPTIONS, DATASETS, SPLIT_OPTIONS

    accepted = {**DATASETS[s.dataset].options, **COMMON_OPTIONS}
    unknown = sorted(set(s.options) - set(accepted))
    if unknown:
        names = ", ".join(accepted) or "none"
        raise ConfigError(f"data set {s.dataset} has no option {unknown[0]!r} (its options: {names}).",
                          field="options")
    for key, value in s.options.items():  # an image folder's split options default to None ("not given")
        _check_option(key, value, SPLIT_OPTIONS.get(key) if accepted[key] is None else accepted[key])
    if s.options.get("val_fraction") is not None and s.options.get("train_per_class") is not None:
        raise ConfigError("options: give val_fraction or train_per_class, not both (train_per_class alone sets the "
                          "split).", field="options")
    if s.options.get("seed") is not None and not 0 <= s.options["seed"] <= MAX_SEED:
        raise ConfigError(f"options.seed must be between 0 and {MAX_SEED}, got {s.options['seed']!r}.", field="options")


def _check_option(key: str, value: Any, default: Any) -> None:
    """An option value is a scalar of its default's type (any number where the default is a number or None)."""
    if value is None:
        return
    wrong = ConfigError(f"options.{key} must be {_kind(default)}, got {value!r}.", field="options")
    if isinstance(default, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise wrong
        return
    if isinstance(default, (int, float)) or default is None:
        _number(f"options.{key}", value, integer=default is None or isinstance(default, int))
        return
    if not isinstance(value, type(default)):
        raise wrong


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    return {int: "an integer", float: "a number", str: "text"}.get(type(default), f"a {type(default).__name__}")


def _check_data_present(s: StageConfig) -> None:
    from core.datasets import DATASETS, DatasetError, DatasetMissing, class_counts  # here: it imports torch

    info = DATASETS[s.dataset]
    if info.folder is None:
        return
    root = Path(str(s.root))
    if not info.own_folder and not root.is_dir():
        fix = "set root to the folder that holds the data set" if root.exists() else \
            f"download {s.dataset} there or set root"
        raise ConfigError(f"root {root} {paths.not_a_folder(root)}; {fix}.", field="root")
    try:
        for split in ("train", "val"):  # a val/ problem too is refused here, before a run is made for it
            class_counts(s.dataset, s.root, split, **s.options)
    except (DatasetMissing, DatasetError) as exc:
        raise ConfigError(str(exc), field="root") from None


def _resolve_paths(s: StageConfig, base: Path, data_root: str | Path | None, check_data: bool) -> None:
    from core.datasets import DATASETS

    if s.root is None and DATASETS[s.dataset].own_folder:
        raise ConfigError(f"root is required for dataset {s.dataset}: the folder that holds your images "
                          "(one folder per class, or train/ and val/ folders of class folders).", field="root")
    if s.root is None:
        s.root = str(Path(data_root).resolve() if data_root is not None else paths.data_root())
    else:
        s.root = str(_typed(s.root, base, "root"))
    if s.init not in NAMED_INITS:
        s.init = str(_typed(s.init, base, "init"))
    if check_data:
        _check_files(s)


def check_stage_files(config: PipelineConfig, index: int) -> None:
    """What ``check_data`` checks, for stage ``index`` alone (a command that reads one stage, such as lr-find):
    its data set where it will read it, and its init checkpoint."""
    try:
        _check_files(config.stages[index])
    except ConfigError as exc:
        raise exc.in_stage(index, stage_label(index, config.stages[index])) from None


def _check_files(s: StageConfig) -> None:
    _check_data_present(s)
    if s.init not in NAMED_INITS and (problem := missing_init(s.init)):
        raise ConfigError(f"init checkpoint {problem}.", field="init")


def missing_init(path: str | Path) -> str | None:
    """Why an init checkpoint cannot be read where the pipeline names it ("X does not exist", "X is a folder"), or
    None when a file is there."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        return f"{path} does not exist"
    return f"{path} is {'a folder' if path.is_dir() else 'not a regular file (a pipe or device)'}"


def _typed(text: str, base: Path, key: str) -> Path:
    try:
        return paths.typed_path(text, base)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}", field=key) from None


def _name_text(value: Any, where: str, stage: int | None = None) -> str:
    """A name as text. YAML reads ``name: 2024`` as a number and ``name:`` as nothing: both are refused with how
    to write them, rather than renamed (YAML 1.1 reads 010 as 8)."""
    if value is None or value == "":
        raise ConfigError(f"{where}: name is empty; give it a name.", stage=stage, field="name")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: name {value!r} must be text; quote it in YAML (name: '{value}').",
                          stage=stage, field="name")
    return value


def _check_stage_names(stages: list[StageConfig]) -> None:
    seen: set[str] = set()
    for i, s in enumerate(stages):
        s.name = _name_text(s.name, stage_label(i), stage=i)
        try:
            paths.safe_name(s.name)
        except ValueError:
            raise ConfigError(f"{stage_label(i)}: name {s.name!r} must be letters, digits, '.', '_' or '-'.",
                              stage=i, field="name") from None
        if s.name in seen:
            raise ConfigError(f"{stage_label(i, s)}: name {s.name!r} is used by an earlier stage.",
                              stage=i, field="name")
        seen.add(s.name)


# ------------------------------------------------------------------ the stage table
TEXT_KEYS = ("name", "dataset", "root", "init", "train_layers", *CHOICES)  # cells that are plain words


def stage_rows(stages: list[dict[str, Any]]) -> list[dict[str, str | None]]:
    """A pipeline's stages as table rows of text cells (every stage key; defaults filled in, options as JSON)."""
    columns = ["name", "dataset", *[k for k in STAGE_DEFAULTS if k != "name"], "options"]
    rows = []
    for stage in stages:
        values = {**STAGE_DEFAULTS, **stage}
        rows.append({k: _cell_text(k, values.get(k)) for k in columns})
    return rows


def _cell_text(key: str, value: Any) -> str | None:
    if key == "options":
        return json.dumps(value or {})
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)  # 0.0005, 1e-05, true: YAML reads them back


def stages_from_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage dicts from table rows, keeping every typed value exactly (text read as a YAML scalar: ``2.5`` stays
    2.5 and is then refused for epochs); a blank cell means the default. A row with no data set, or a cell that
    cannot be read, is a ``ConfigError`` with the row's stage index and the field."""
    stages = []
    for i, row in enumerate(rows):
        stage: dict[str, Any] = {}
        for key, cell in row.items():
            if _blank(cell):
                continue
            try:
                stage[key] = _cell_value(key, cell)
            except ConfigError as exc:
                raise exc.in_stage(i, stage_label(i)) from None
        if "dataset" not in stage:
            what = "is empty" if not stage else "has no data set"
            raise ConfigError(f"{stage_label(i, stage)}: the row {what}; choose a data set or delete the row.",
                              stage=i, field="dataset")
        stages.append(stage)
    return stages


def _blank(cell: Any) -> bool:
    return cell is None or (isinstance(cell, float) and math.isnan(cell)) or (isinstance(cell, str) and not cell.strip())


def _cell_value(key: str, cell: Any) -> Any:
    if hasattr(cell, "item"):  # numpy scalars from a numeric column
        cell = cell.item()
    if not isinstance(cell, str):
        value = cell
    elif key in TEXT_KEYS:
        return cell.strip()
    else:
        try:
            value = parse_yaml(cell)
        except yaml.YAMLError:
            raise ConfigError(f"{key} {cell!r} cannot be read as {'JSON' if key == 'options' else 'a value'}.",
                              field=key) from None
    default = STAGE_DEFAULTS.get(key)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and value.is_integer():
        return int(value)  # 4.0 is exactly 4
    return value


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
        except YamlRefused as exc:
            raise ConfigError(f"Override {item!r} was refused: {exc}.") from None
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
        _set_path(target, parts, value, item)


def _find_stage(stages: list[Any], ref: str, item: str) -> dict[str, Any]:
    if ref.isdigit():
        if not 1 <= int(ref) <= len(stages):
            raise ConfigError(f"Override {item!r}: stages are numbered 1 to {len(stages)}.")
        return stages[int(ref) - 1]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == ref:
            return stage
    raise ConfigError(f"Override {item!r}: there is no stage named {ref!r}.")


def _set_path(target: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    for part in parts[:-1]:
        if target.get(part) is None:  # absent, or `options:` left empty in the YAML
            target[part] = {}
        target = target[part]
        if not isinstance(target, dict):
            raise ConfigError(f"Override {item!r}: {part} is a single value, not a mapping of keys.")
    target[parts[-1]] = value


def compiles(compile_setting: bool | str, device_type: str) -> bool:
    """Whether a pipeline's ``compile`` setting means torch.compile on this device (``auto``: on CUDA only)."""
    return compile_setting is True or (compile_setting == "auto" and device_type == "cuda")
