"""The training loop: stages of a pipeline, one after the other, recorded in the run store.

Plain and readable, in the style of torchvision's classification references. Each stage builds a
ResNet from its ``init`` with a new head, trains it for ``epochs`` epochs (per-step LR schedule with
linear warm-up, optional head-only epochs first), validates after every epoch (per-class results
and confusion matrix into the store) and writes ``last.pt`` (every epoch) and ``best.pt`` (the best value of
the stage's ``select`` metric) atomically under ``<run dir>/stage<k>-<name>/``.

Faults: SIGTERM/SIGINT/SIGHUP (to the trainer or its whole process group, see train/signals.py)
finish the current step, save ``last.pt`` (mid-epoch position included) and mark the run ``stopped``;
a NaN/inf loss marks it ``failed``; after any crash, ``resume`` continues from the newest ``last.pt``
and deletes store rows written after it, so metrics are never lost or duplicated. Under ``torchrun`` only rank 0 writes the store and checkpoints.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from core import evaluation, ood, paths
from core.checkpoints import (check_compatible, checkpoint_info, class_change, inference_weights, load_checkpoint,
                              load_weights, save_checkpoint)
from core.datasets import SPLIT_OPTIONS, DatasetMissing, class_counts, open_dataset
from core.errors import UserError
from core.models import Preprocessing, build_model
from core.run_store import RunStore, RunStoreError
from core.tempfiles import sweep_stale
from train import distributed as ddp
from train.config import SELECTED_METRIC, PipelineConfig, StageConfig, compiles, stage_label
from train.device_batches import DeviceBatches, use_device_path
from train.image_cache import (CachedImages, Normalizer, augmentation, counts_without_skipped, open_cached_split,
                               sweep_stale_builds)
from train.progress import Progress, StageWork, gpu_usage
from train.recipe import Mixer, batch_mixer, training_loss, weight_average
from train.reproducible import SeededItems, batch_seed, resume_mismatch, rng_state, seeded, set_rng_state
from train.signals import StopFlag, start_workers, worker_init_fn
from train.tensorboard_log import TensorBoardLog
from train.trainer_lock import trainer_lock

HEARTBEAT_S = 2.0
PROGRESS_LINE_S = 15.0  # without a terminal (a log file), a progress line this often
STEP_FLUSH_S = 2.0
STORE_PATIENCE_S = 3600.0  # a run waits this long for a run store another process locked, then fails
MISCLASSIFIED_KEPT = 200


class TrainingFailed(UserError):
    """Training cannot go on (diverged loss, ...); the message says why and what to try."""


class ResumeRefused(UserError):
    """A resume that cannot continue the run as it is now run (another number of processes); the run keeps the
    state it had, and the message says how to resume it."""


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; ``last.pt`` has been saved."""


# ----------------------------------------------------------------- building blocks
def steps_per_epoch(samples_per_rank: int, batch_size: int) -> int:
    """Batches per epoch: the last partial batch is dropped unless it is the only one."""
    return samples_per_rank // batch_size if samples_per_rank >= batch_size else 1


def stage_dir(run_name: str, index: int, stage: StageConfig) -> Path:
    return paths.run_dir(run_name) / f"stage{index + 1}-{stage.name}"


def trainable_prefixes(train_layers: str, head_only: bool) -> tuple[str, ...] | None:
    """Parameter-name prefixes that train (None = all): ``head`` -> fc, ``from:layer3`` -> layer3, layer4, fc."""
    if head_only or train_layers == "head":
        return ("fc.",)
    if train_layers.startswith("from:layer"):
        first = int(train_layers[-1])
        return tuple(f"layer{k}." for k in range(first, 5)) + ("fc.",)
    return None


def set_trainable(model: nn.Module, prefixes: tuple[str, ...] | None) -> None:
    """Freeze every parameter outside ``prefixes``; frozen BatchNorm layers keep their statistics."""
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(prefixes is None or name.startswith(prefixes))
    if prefixes is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (name + ".").startswith(prefixes):
            module.eval()


def class_weights(counts: list[int], mode: str, beta: float) -> torch.Tensor | None:
    """Loss weights per class: inverse frequency, or Cui et al. (2019) effective number; sum = #classes."""
    if mode not in ("weighted_loss", "class_balanced"):
        return None
    n = torch.tensor(counts, dtype=torch.double)
    if mode == "weighted_loss":
        w = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    else:
        w = torch.where(n > 0, (1 - beta) / (1 - beta ** n), torch.zeros_like(n))
    return (w * len(counts) / w.sum()).float()


def lr_lambda(stage: StageConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step LR factor: linear warm-up, then cosine to zero, x0.1 steps at 50%/75%, or constant."""
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = int(round(stage.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if stage.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if stage.schedule == "step":
            return 0.1 ** sum(progress >= m for m in (0.5, 0.75))
        return 1.0

    return factor


def make_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, momentum) or AdamW over every parameter; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=stage.lr)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision: bf16 on GPUs that have it, fp16 on older GPUs, bf16 on CPUs with native bf16
    (AVX512-BF16/AMX: ~1.5x faster training here, bench/train_throughput.py), else none."""
    if device.type == "cuda":  # bf16 in hardware (Ampere and later); older GPUs would only emulate it, slowly
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class StageData:
    train: CachedImages
    val: CachedImages
    classes: list[str]
    train_counts: list[int]
    preprocessing: Preprocessing
    images: dict[str, str]  # LabeledImages.digest of each split: a resume refuses other images, eval warns


def position(sampler: ddp.ShardedSampler, epoch: int, start: int) -> dict[str, Any]:
    """Where an epoch stands, as a checkpoint stores it and a resume compares it (``resume_mismatch``)."""
    return {**sampler.state_dict(), "epoch": epoch, "start": start}


def load_stage_data(stage: StageConfig, ctx: ddp.Dist, check: Callable[[], None] | None = None) -> StageData:
    """Both splits, decoded once into the image cache (rank 0 builds it, other ranks wait).

    ``check`` runs after every batch a build decodes (it raises to stop the build).
    """
    pre = Preprocessing.for_size(stage.image_size)

    def open_split(split: str, augment: str, build: bool) -> tuple[CachedImages, Any]:
        return open_cached_split(stage.dataset, stage.root, split, stage.options, pre.resize,
                                 augmentation(augment, stage.image_size), stage.num_workers, build=build,
                                 check=check, crop=stage.image_size)

    if not ctx.is_main:
        ddp.barrier(ctx)  # rank 0 is building the cache
    train, raw_train = open_split("train", stage.augment, ctx.is_main)
    val, raw_val = open_split("val", "none", ctx.is_main)
    if ctx.is_main:
        ddp.barrier(ctx)
    classes = list(raw_train.class_labels)
    counts = [0] * len(classes)
    for t in train.targets:
        counts[t] += 1
    images = {"train": raw_train.digest(stage.root), "val": raw_val.digest(stage.root)}
    return StageData(train, val, classes, counts, pre, images)


# ------------------------------------------------------------------- progress
class Display:
    """A tqdm bar on a terminal; otherwise a plain progress line every ``PROGRESS_LINE_S`` seconds (log files)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stdout.isatty() and _has_tqdm()
        self.bar: Any = None
        self.last = 0.0
        self.loss: float | None = None

    def start_epoch(self, label: str, steps: int) -> None:
        self._safely(self._start_epoch, label, steps)

    def _start_epoch(self, label: str, steps: int) -> None:
        self.close()
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=label, unit="step", dynamic_ncols=True, leave=True)
        elif self.enabled:
            print(f"{label}: {steps} steps", flush=True)

    def _safely(self, show: Callable[..., None], *args: Any) -> None:
        """Show something; a terminal that went away (EIO, EPIPE) ends the display, never the run."""
        try:
            show(*args)
        except OSError:
            self.enabled, self.bar = False, None

    def step(self, progress: Progress) -> None:
        self._safely(self._step, progress)

    def step_loss(self, loss: float) -> None:
        """The latest loss that reached the host (step rows are flushed every few seconds)."""
        self.loss = loss

    def _step(self, progress: Progress) -> None:
        if not self.enabled:
            return
        ips = f"{progress.images_per_s:.1f}" if progress.images_per_s else "?"
        eta = _duration(progress.eta_s)
        loss = "?" if self.loss is None else f"{self.loss:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss} | {ips} img/s | ETA {eta}", refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self.last > PROGRESS_LINE_S:
            self.last = time.monotonic()
            print(f"  step {progress.step}  loss {loss}  {ips} img/s  ETA {eta}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self._safely(self._message, text)

    def _message(self, text: str) -> None:
        self.close()
        print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            self._safely(bar.close)


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _NoStore:
    """What ranks other than 0 write to: nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Heartbeat(threading.Thread):
    """Writes ``progress`` to the run store every ``HEARTBEAT_S`` seconds until stopped."""

    def __init__(self, store: RunStore, run_name: str, progress: Progress, device: torch.device | None = None) -> None:
        super().__init__(name="reslens-heartbeat", daemon=True)
        self.store, self.run_name, self.progress, self.device = store, run_name, progress, device
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                gpu = gpu_usage(self.device)
                self.store.heartbeat(self.run_name, **self.progress.fields(), **({"gpu": gpu} if gpu else {}))
            except Exception:  # noqa: BLE001 - a busy store must not kill training; the next beat retries
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


# ------------------------------------------------------------------- trainer
@dataclass
class ResumePoint:
    stage: int
    checkpoint: dict[str, Any] | None = None


def find_resume_point(config: PipelineConfig, run_name: str) -> ResumePoint:
    """The first stage whose ``last.pt`` is missing or not at its final epoch, with that checkpoint."""
    for i, stage in enumerate(config.stages):
        last = stage_dir(run_name, i, stage) / "last.pt"
        if not last.is_file():
            return ResumePoint(i)
        ckpt = load_checkpoint(last)
        if (ckpt["epoch"] < stage.epochs and not ckpt.get("stopped_early")) or ckpt.get("batches_done", 0):
            return ResumePoint(i, ckpt)
    return ResumePoint(len(config.stages))


def resume_line(config: PipelineConfig, run_name: str, point: ResumePoint, done: int) -> str:
    """Where a resume continues, in one line: stage, epoch and step (from 1), or that nothing is left."""
    if point.stage >= len(config.stages):
        return f"Resuming {run_name}: every stage is done; only its final state is recorded."
    label = stage_label(point.stage, config.stages[point.stage])
    if point.checkpoint is None:
        return f"Resuming {run_name} at the start of {label} (pipeline step {done + 1})."
    epoch, batches = point.checkpoint["epoch"], point.checkpoint.get("batches_done", 0)
    where = f"epoch {epoch + 1}, after its step {batches}" if batches else f"the start of epoch {epoch + 1}"
    return f"Resuming {run_name} in {label} at {where} (pipeline step {done + 1})."


class Trainer:
    """Runs the stages of ``config`` as run ``run_name`` on ``ctx``'s device."""

    def __init__(self, config: PipelineConfig, run_name: str, ctx: ddp.Dist, store: RunStore | None,
                 show_progress: bool = True) -> None:
        self.config, self.run_name, self.ctx = config, run_name, ctx
        self.store: Any = store if (store is not None and ctx.is_main) else _NoStore()
        self.progress = Progress()
        self.display = Display(show_progress and ctx.is_main)
        self.stop = StopFlag()
        self.amp = autocast_dtype(ctx.device) if config.amp else None
        self.channels_last = config.channels_last and ctx.device.type in ("cuda", "cpu")
        self.compile = compiles(config.compile, ctx.device.type)
        if ctx.device.type == "cuda":  # fixed input sizes: let cuDNN pick the fastest convolution algorithms
            torch.backends.cudnn.benchmark = True
        self.device_data = use_device_path(config.data_path, ctx.device)  # batch-wise augmentation on the device
        self.step_rows: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.tb = TensorBoardLog(None)

    # -- the whole pipeline
    def run(self, resume: bool = False) -> None:
        """Train every remaining stage; raises StopRequested, TrainingFailed or the underlying error."""
        self.stop.install()  # first: a stop asked for while checkpoints are read is not lost
        try:
            if self.ctx.is_main:  # temporary files of writers that died (SIGKILL, power loss)
                sweep_stale(paths.run_dir(self.run_name), ".*.pt.*.tmp", recursive=True)
                sweep_stale_builds()
            point = find_resume_point(self.config, self.run_name) if resume else ResumePoint(0)
            refusal = other_world(self.config, self.run_name, point, self.ctx.world)
            if refusal:
                raise ResumeRefused(refusal)
            plan = self._plan()
            done = sum(w.steps for w in plan[: point.stage]) + (point.checkpoint or {}).get("step", 0)
            self.progress.set_plan(plan, done)
            if resume:
                self.display.message(resume_line(self.config, self.run_name, point, done))
            if self.ctx.is_main:  # a resumed run's events after its restart point are discarded (purge_step)
                self.tb = TensorBoardLog(paths.run_dir(self.run_name) / "tensorboard",
                                         purge_step=done + 1 if resume else None)
            for i in range(point.stage, len(self.config.stages)):
                self._run_stage(i, point.checkpoint if i == point.stage else None)
        finally:  # the stop handling stays: train_run restores it once the run's ending is stored
            self.tb.close()
            self.display.close()

    def _check_stop(self) -> None:
        """Between batches of an image-cache build: a stop ends the build (its partial file is removed)."""
        if self.stop.requested:
            raise StopRequested()

    def _plan(self) -> list[StageWork]:
        """Every stage's work, for progress and ETA (counted from file lists, nothing decoded)."""
        plan = []
        for s in self.config.stages:
            train = sum(class_counts(s.dataset, s.root, "train", **s.options).values())
            val = sum(class_counts(s.dataset, s.root, "val", **s.options).values())
            steps = s.epochs * steps_per_epoch(-(-train // self.ctx.world), s.batch_size)
            pixels = tuple(float(s.batch_size * s.train_size(e) ** 2) for e in range(s.epochs))
            plan.append(StageWork(steps, s.epochs, sum(pixels) / s.epochs, val, train, pixels))
        return plan

    # -- one stage
    def _run_stage(self, index: int, checkpoint: dict[str, Any] | None) -> None:
        stage = self.config.stages[index]
        label = stage_label(index, stage)
        self.display.message(f"{label}: preparing {stage.dataset} (decoded once into the image cache)")
        data = load_stage_data(stage, self.ctx, check=None if self.ctx.enabled else self._check_stop)
        changed = None if checkpoint is None else class_change(checkpoint["class_names"], data.classes)
        if changed:
            raise TrainingFailed(f"{label} cannot resume: its data set's classes changed since the checkpoint "
                                 f"({changed}); put the folders back as they were and resume, or start a new run.")
        torch.manual_seed(self.config.seed * 1000 + index)  # after the cache: building it draws random numbers
        model = self._build_model(index, stage, data, checkpoint)
        train_loader, sampler = self._train_loader(stage, data)
        check_shard(label, len(sampler), self.ctx.world, stage.train_size_start or stage.image_size)
        per_epoch = steps_per_epoch(len(sampler), stage.batch_size)
        optimizer = make_optimizer(model, stage)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, per_epoch))
        start_epoch, batches_done, best = 0, 0, None
        if checkpoint is not None:
            start_epoch, batches_done = checkpoint["epoch"], checkpoint.get("batches_done", 0)
            expected = position(sampler, start_epoch, batches_done * stage.batch_size)
            problem = resume_mismatch(checkpoint, self.config.written_for(index, checkpoint), expected,
                                      data.images["train"])
            if problem:
                raise TrainingFailed(f"{label} cannot resume: {problem}.")
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            kept = checkpoint["metrics"]  # best_val_acc: checkpoints before `select`, which chose by accuracy
            best = kept.get("best_score", kept.get("best_val_acc"))
        else:
            best = self._kept_best(index, stage)
            if best is None:
                self._say_restart(index, stage)
        step = start_epoch * per_epoch + batches_done
        self.store.upsert_stage(self.run_name, index, stage.name, stage.dataset, stage.epochs, data.classes)
        self.store.truncate_after(self.run_name, index, start_epoch, step=step)
        state = _StageState(index, stage, label, data, model, optimizer, scheduler, sampler, train_loader,
                            per_epoch, step, best, self.channels_last,
                            mixer=batch_mixer(stage, len(data.classes)), ema=weight_average(model, stage.ema),
                            train_size=stage.image_size)  # the size the loader was made for
        if checkpoint is not None:
            state.load_trainer_state(checkpoint.get("trainer_state") or {})
        for epoch in range(start_epoch, stage.epochs):
            self._run_epoch(state, epoch, batches_done if epoch == start_epoch else 0)
            if state.stopped_early:
                break
        self.progress.finish_stage(index)
        if not state.stopped_early:
            self.store.update_stage(self.run_name, index, completed_epochs=stage.epochs)
        self.tb.hparams(stage_dir(self.run_name, index, stage).name, stage.to_dict(), state.best)
        if index + 1 < len(self.config.stages) and self._stop_agreed():
            raise StopRequested()  # between stages; after the last one a stop changes nothing: the run finishes

    def _kept_best(self, index: int, stage: StageConfig) -> float | None:
        """The selected metric to beat when a stage restarts but an earlier attempt's ``best.pt`` is there (its
        ``last.pt`` was lost): that ``best.pt`` is only replaced by a better epoch."""
        path = stage_dir(self.run_name, index, stage) / "best.pt"
        if not self.ctx.is_main or not path.is_file():
            return None
        try:
            kept = load_checkpoint(path)
        except UserError:
            return None  # unreadable: the restarted stage writes a new one
        metrics = kept.get("metrics") or {}
        accuracy, score = metrics.get("val_acc"), metrics.get(SELECTED_METRIC[stage.select])
        if not self.config.written_for(index, kept) or accuracy is None or score is None:
            return None
        print(f"{stage_label(index, stage)}: last.pt is missing, so the stage restarts from epoch 1; its best.pt "
              f"(epoch {kept.get('epoch')}, val acc {accuracy:.3f}) is kept until an epoch beats it.",
              file=sys.stderr, flush=True)
        self.store.update_stage(self.run_name, index, best_path=str(path), best_val_acc=accuracy,
                                best_epoch=kept.get("epoch"))
        return float(score)

    def _say_restart(self, index: int, stage: StageConfig) -> None:
        """Say so when a stage with recorded epochs restarts from epoch 1: its ``last.pt`` was never written (the
        trainer was killed while writing its first one) or was lost."""
        recorded = self.store.class_result_epochs(self.run_name, index)  # None on ranks other than 0
        if recorded:
            print(f"{stage_label(index, stage)}: no last.pt of it is there, so the stage restarts from epoch 1 "
                  f"(its {len(recorded)} recorded epoch(s) are trained again).", file=sys.stderr, flush=True)

    def _build_model(self, index: int, stage: StageConfig, data: StageData,
                     checkpoint: dict[str, Any] | None) -> nn.Module:
        init = stage.init
        if checkpoint is not None:
            init = "scratch"
        elif init == "previous":
            init = str(stage_dir(self.run_name, index - 1, self.config.stages[index - 1]) / "best.pt")
        model = build_model(self.config.arch, len(data.classes), init, data.classes)
        if checkpoint is not None:
            load_weights(model, checkpoint["model"], "the checkpoint this stage resumes from")
        model = model.to(self.ctx.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def _train_loader(self, stage: StageConfig, data: StageData,
                      sampler: ddp.ShardedSampler | None = None) -> tuple[Any, ddp.ShardedSampler]:
        if sampler is None:
            weights = None
            if stage.imbalance == "weighted_sampler":
                weights = [1.0 / data.train_counts[t] for t in data.train.targets]
            sampler = ddp.ShardedSampler(len(data.train), self.config.seed, self.ctx.rank, self.ctx.world,
                                         weights=weights, seeded=True)
        drop_last = sampler.per_rank >= stage.batch_size
        if self.device_data:  # each batch's draws seeded by its first sample's seed (train/device_batches.py)
            return DeviceBatches(data.train, stage.augment, stage.image_size, stage.batch_size, self.ctx.device,
                                 sampler, drop_last), sampler
        # augmentation draws from per-sample seeds; the loader's own generator keeps the global RNG untouched
        loader = DataLoader(SeededItems(data.train), batch_size=stage.batch_size, sampler=sampler,
                            drop_last=drop_last, num_workers=stage.num_workers,
                            pin_memory=self.ctx.device.type == "cuda", persistent_workers=stage.num_workers > 0,
                            generator=torch.Generator().manual_seed(self.config.seed), worker_init_fn=worker_init_fn())
        return loader, sampler

    def _resize_training(self, st: "_StageState", epoch: int) -> bool:
        """Train this epoch at its size on the stage's resolution schedule; whether the size changed (workers
        hold the old transform, so a DataLoader with workers is made again)."""
        size = st.stage.train_size(epoch)
        if size == st.train_size:
            return False
        st.train_size = size
        if isinstance(st.loader, DeviceBatches):
            st.loader.size = size
            return True
        st.data.train.transform = augmentation(st.stage.augment, size)
        if st.stage.num_workers > 0:
            st.loader, _ = self._train_loader(st.stage, st.data, st.sampler)
        return True

    # -- one epoch
    def _run_epoch(self, st: "_StageState", epoch: int, skip_batches: int) -> None:
        prefixes = trainable_prefixes(st.stage.train_layers, head_only=epoch < st.stage.freeze_epochs)
        train_model, fresh = st.wrapped(prefixes, self.ctx, self.compile)
        resized = self._resize_training(st, epoch)
        if resized and st.stage.train_size_start:
            self.display.message(f"{st.label} epoch {epoch + 1}: training at {st.train_size} px")
        if (fresh or resized) and self.compile:  # torch.compile builds kernels for a new model or input shape at
            self.progress.phase = "compiling"    # the first step (Progress.advance clears the phase)
            self.display.message(f"{st.label}: compiling the model (torch.compile); the first steps take longer")
        st.sampler.set_epoch(epoch, start=skip_batches * st.stage.batch_size)
        self.progress.start_epoch(st.index, epoch + 1, st.step, retime=fresh)  # fresh: other layers train now
        self.store.heartbeat(self.run_name, **self.progress.fields())
        self.display.start_epoch(f"{st.label} epoch {epoch + 1}/{st.stage.epochs}",
                                 st.steps_per_epoch - skip_batches)
        started, carried = time.monotonic(), st.totals[2]
        totals = self._train_steps(st, train_model, epoch, skip_batches)
        elapsed = time.monotonic() - started
        self._flush_steps(st, epoch + 1, force=True)
        metrics = self._validate(st, epoch, totals, elapsed, carried)
        val_loss = ddp.broadcast(self.ctx, metrics.get("val_loss"))  # validation runs on rank 0: all ranks fail
        if val_loss is not None and not math.isfinite(val_loss):
            self._diverged(st, epoch, None, val_loss)
        self._end_epoch(st, epoch, metrics)
        if epoch + 1 < st.stage.epochs and not st.stopped_early and self._stop_agreed():
            raise StopRequested()  # a stage's last epoch: the stage ends first (_run_stage)

    def _train_steps(self, st: "_StageState", model: nn.Module, epoch: int, batch_index: int) -> list[float]:
        """Train one (rest of an) epoch; returns summed [loss*n, correct, n] over all ranks."""
        criterion = training_loss(st.weights(self.ctx.device), st.stage.label_smoothing)
        for images, labels in start_workers(st.loader):
            images = st.normalize(images.to(self.ctx.device, non_blocking=True))
            labels = labels.to(self.ctx.device, non_blocking=True)
            targets = labels
            if st.mixer is not None:  # soft targets; "correct" then counts the larger of the two classes
                with seeded(batch_seed(self.config.seed, epoch, st.step, self.ctx.rank)):
                    images, targets = st.mixer(images, labels)
                labels = targets.argmax(1)
            with torch.autocast(self.ctx.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            value, stop = self._agree(loss.detach())
            if isinstance(value, float) and not math.isfinite(value):  # DDP: every rank sees the same value
                self._diverged(st, epoch, st.step + 1, value)
            lr = st.optimizer.param_groups[0]["lr"]
            st.optimizer.zero_grad(set_to_none=True)
            st.backward(loss, scaled=self.amp == torch.float16)
            if st.ema is not None:
                st.ema.update_parameters(st.model)
            st.scheduler.step()
            batch_index += 1
            st.step += 1
            st.add_to_totals(loss.detach(), logits.detach().argmax(1) == labels)
            self._after_step(st, epoch, value, lr, len(labels) * self.ctx.world)
            if stop and batch_index < st.steps_per_epoch:  # this step is applied; resume starts after it
                self._save_stop(st, epoch, batch_index)
        totals, st.totals = st.host_totals(), [0.0, 0.0, 0.0]
        return ddp.all_sum(self.ctx, totals)

    def _agree(self, loss: torch.Tensor) -> tuple[float | torch.Tensor, bool]:
        """(the step's loss, whether to stop). One process: the loss stays on the device and the stop flag is
        the host's, so a step never waits for the device. DDP: the mean loss over ranks and whether any rank
        was asked to stop, as floats (one all-reduce), so that every rank acts on the same step."""
        if not self.ctx.enabled:
            return loss, self.stop.requested
        loss_value, stop = ddp.all_sum(self.ctx, [float(loss), float(self.stop.requested)])
        return loss_value / self.ctx.world, stop > 0

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: a signal may reach one rank only (the app stops rank 0's pid), and
        one that lands after an epoch's last step must stop every rank there, or the others wait for it forever."""
        if not self.ctx.enabled:
            return self.stop.requested
        return ddp.all_sum(self.ctx, [float(self.stop.requested)])[0] > 0

    @staticmethod
    def _diverged(st: "_StageState", epoch: int, step: int | None, value: float) -> None:
        """Fail the run on a non-finite training loss at ``step``, or (``step`` None) validation loss."""
        what = "NaN" if math.isnan(value) else "infinite"
        where = f"the loss became {what} in {st.label}, epoch {epoch + 1}, step {step}" if step is not None else \
            f"the validation loss became {what} in {st.label} after epoch {epoch + 1}"
        raise TrainingFailed(f"Training stopped: {where}; try a lower learning rate (lr is {st.stage.lr:g}).")

    def _after_step(self, st: "_StageState", epoch: int, loss: float | torch.Tensor, lr: float,
                    images: int) -> None:
        self.progress.advance(images, st.step)
        self.step_rows.append({"step": st.step, "train_loss": loss, "lr": lr, "time": time.time()})
        st.last_lr = lr
        self._flush_steps(st, epoch + 1)
        self.display.step(self.progress)

    def _flush_steps(self, st: "_StageState", epoch: int, force: bool = False) -> None:
        """Write the buffered step rows (every ``STEP_FLUSH_S`` or when forced): the steps' losses come to the
        host here, in one transfer, and a non-finite one fails the run with its step."""
        if not self.step_rows or not (force or time.monotonic() - self.last_flush > STEP_FLUSH_S):
            return
        rows, self.step_rows = self.step_rows, []
        self.last_flush = time.monotonic()
        for row, value in zip(rows, host_floats([r["train_loss"] for r in rows])):
            row["train_loss"] = value
            if not math.isfinite(value):
                self._diverged(st, epoch - 1, row["step"], value)
        self.store.log_steps(self.run_name, st.index, epoch, rows)
        earlier = self.progress.done_steps - st.step  # the pipeline's steps before this stage
        for row in rows:
            self.tb.step(earlier + row["step"], row["train_loss"], row["lr"])
        self.display.step_loss(rows[-1]["train_loss"])

    def _save_stop(self, st: "_StageState", epoch: int, batch_index: int) -> None:
        self._flush_steps(st, epoch + 1, force=True)
        if self.ctx.is_main:  # recorded too: the app then says Resume continues from this step
            last = self._save(st, "last", epoch, batch_index, {"best_score": st.best})
            self.store.update_stage(self.run_name, st.index, last_path=str(last))
        ddp.barrier(self.ctx)
        raise StopRequested()

    def _validate(self, st: "_StageState", epoch: int, totals: list[float], elapsed: float,
                  carried: float = 0.0) -> dict[str, Any]:
        """The epoch's metrics; on rank 0 it also validates and records them (store, TensorBoard, misclassified
        samples, OOD thresholds). ``carried``: images of this epoch trained before a resume, not timed here."""
        loss_sum, correct, seen = totals
        timed = seen - carried * self.ctx.world
        metrics: dict[str, Any] = {
            "train_loss": loss_sum / seen if seen else None, "train_acc": correct / seen if seen else None,
            "lr": st.last_lr, "epoch_time_s": elapsed,
            "images_per_s": timed / elapsed if elapsed > 0 and timed > 0 else None,
        }
        if not self.ctx.is_main:
            return metrics
        started = time.monotonic()
        preds = evaluation.predict(st.evaluated, self._val_loader(st), self.ctx.device, prepare=st.normalize,
                                   autocast_dtype=self.amp, flip=st.stage.tta)
        self.progress.validated(time.monotonic() - started)
        if not math.isfinite(preds.loss):  # outputs not finite: nothing of this epoch is kept; _run_epoch fails
            return {**metrics, "val_loss": preds.loss}
        confusion = preds.confusion(len(st.data.classes))
        result = evaluation.class_result(st.data.classes, confusion, st.data.train_counts, preds.top5_accuracy)
        metrics.update(val_loss=preds.loss, val_acc=result["accuracy"], val_balanced_acc=result["balanced_acc"])
        st.ood = ood.calibrate(preds.view_confidence, preds.logsumexp)  # saved with this epoch's checkpoints
        earlier = sum(s.epochs for s in self.config.stages[: st.index])
        self.tb.epoch(earlier + epoch + 1, metrics, stage_dir(self.run_name, st.index, st.stage).name, confusion)
        self.store.log_epoch(self.run_name, st.index, epoch + 1, step=st.step, **metrics)
        self.store.save_class_results(self.run_name, st.index, epoch + 1, result)
        wrong = evaluation.misclassified(preds, st.data.classes, st.data.val.source, MISCLASSIFIED_KEPT)
        self.store.save_misclassified(self.run_name, st.index, epoch + 1, wrong,
                                      best_epoch=epoch + 1 if st.improves(metrics) else None)
        return metrics

    def _val_loader(self, st: "_StageState") -> Any:
        """Validation batches: centre crops gathered on the device in large batches, or a plain DataLoader."""
        if not self.device_data:
            return DataLoader(st.data.val, batch_size=max(st.stage.batch_size, 64), num_workers=0)
        if st.val_batches is None:  # the split's pixels are held once per stage
            st.val_batches = DeviceBatches(st.data.val, "none", st.stage.image_size, max(st.stage.batch_size, 256),
                                           self.ctx.device)
        return st.val_batches

    def _end_epoch(self, st: "_StageState", epoch: int, metrics: dict[str, Any]) -> None:
        score = metrics.get(SELECTED_METRIC[st.stage.select])  # what picks best.pt and drives patience
        improved = st.improves(metrics)
        if improved:
            st.best = score
        st.stopped_early = ddp.broadcast(self.ctx, st.early_stop(score)) and epoch + 1 < st.stage.epochs
        if self.ctx.is_main:
            summary = {**metrics, "best_score": st.best}
            if improved:  # best first (and recorded): last.pt marks progress, so a failure after it never loses it
                best = self._save(st, "best", epoch + 1, 0, summary)
                self.store.update_stage(self.run_name, st.index, best_path=str(best),
                                        best_val_acc=metrics.get("val_acc"), best_epoch=epoch + 1)
            last = self._save(st, "last", epoch + 1, 0, summary)
            self.store.update_stage(self.run_name, st.index, last_path=str(last), completed_epochs=epoch + 1)
            self.display.message(_epoch_line(st.label, epoch + 1, st.stage.epochs, metrics))
            if st.stopped_early:
                metric = "balanced accuracy" if st.stage.select == "balanced" else "accuracy"
                self.display.message(f"{st.label} stops early after epoch {epoch + 1}: validation {metric} has "
                                     f"not improved for {st.stage.patience} epoch(s).")
        ddp.barrier(self.ctx)

    def _save(self, st: "_StageState", kind: str, epoch: int, batches_done: int, metrics: dict[str, Any]) -> Path:
        """``best.pt`` holds the weights only; ``last.pt`` also everything a resume needs (optimizer,
        scheduler, sampler position, ``trainer_state``: RNG states, the epoch's running totals, extra state)."""
        payload = {
            "arch": self.config.arch, "num_classes": len(st.data.classes), "class_names": st.data.classes,
            "preprocessing": st.data.preprocessing.to_dict(),
            "epoch": epoch, "batches_done": batches_done, "step": st.step,
            "stage_index": st.index, "stage_name": st.stage.name, "stage_config": st.stage.to_dict(),
            "config_hash": self.config.stage_hash(st.index), "metrics": _plain(metrics),
            "run_name": self.run_name, "dataset": st.stage.dataset, "stopped_early": st.stopped_early,
            "ood": st.ood, "images": st.data.images, "train_counts": st.data.train_counts,
        }
        stage_done = batches_done == 0 and (epoch >= st.stage.epochs or st.stopped_early)
        # the weights its metrics were measured with (the EMA when on), except where a resume needs the raw ones
        payload["model"] = (st.evaluated if kind == "best" or stage_done else st.model).state_dict()
        if kind == "last" and not stage_done:  # a finished stage never resumes: its last.pt keeps the weights only
            payload.update(
                optimizer=st.optimizer.state_dict(), scheduler=st.scheduler.state_dict(),
                sampler=position(st.sampler, epoch, batches_done * st.stage.batch_size),
                trainer_state=st.trainer_state(),
            )
        with self.stop.held():  # a stop signal is acted on after the write, never inside torch.save
            return save_checkpoint(stage_dir(self.run_name, st.index, st.stage) / f"{kind}.pt", payload)


@dataclass
class _StageState:
    """Everything one stage's epochs share."""

    index: int
    stage: StageConfig
    label: str
    data: StageData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ddp.ShardedSampler
    loader: Any  # a DataLoader of SeededItems, or DeviceBatches
    steps_per_epoch: int
    step: int
    best: float | None
    channels_last: bool = False
    last_lr: float | None = None  # the learning rate of the latest step (the epoch row's lr)
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch's [loss*n, correct, n]
    _device_totals: torch.Tensor | None = None  # [loss*n, correct] running on the device (see add_to_totals)
    best_selected: float | None = None  # early stopping: the best validation metric (``select``) so far
    stale_epochs: int = 0  # epochs since it last improved
    stopped_early: bool = False
    ood: dict[str, Any] = field(default_factory=dict)  # out-of-distribution thresholds (core.ood) of the epoch
    mixer: Mixer | None = None
    ema: nn.Module | None = None  # torch.optim.swa_utils.AveragedModel when stage.ema > 0
    val_batches: DeviceBatches | None = None  # validation on the device path, built at the first epoch's end
    train_size: int = 0  # the training image size the loader makes now (StageConfig.train_size)
    _wrapped: nn.Module | None = None
    _prefixes: tuple[str, ...] | None = None  # the trainable layers the wrapped model was made for
    _scaler: Any = None
    _normalize: Normalizer | None = None
    _restored: dict[str, Any] = field(default_factory=dict)  # trainer_state entries waiting for their object

    def stateful(self) -> dict[str, Any]:
        """Objects (with ``state_dict``/``load_state_dict``) whose state a resume needs, by name."""
        return {name: obj for name, obj in (("scaler", self._scaler), ("ema", self.ema)) if obj is not None}

    def add_to_totals(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        """Add a step's loss and correct predictions to the epoch's totals without waiting for the device: the
        running sum stays there, started from the host totals, so the order of additions (and the result, bit
        for bit) does not depend on when ``host_totals`` was called."""
        n = len(correct)
        if self._device_totals is None:
            self._device_totals = torch.tensor(self.totals[:2], dtype=torch.float64, device=loss.device)
        self._device_totals = self._device_totals + torch.stack([loss.double() * n, correct.sum().double()])
        self.totals[2] += n

    def host_totals(self) -> list[float]:
        """The epoch's [loss*n, correct, n] on the host (one transfer)."""
        if self._device_totals is not None:
            self.totals[:2] = self._device_totals.tolist()
            self._device_totals = None
        return list(self.totals)

    def trainer_state(self) -> dict[str, Any]:
        """What ``last.pt`` keeps besides model, optimizer and scheduler for an exact resume."""
        state = {"rng": rng_state(), "epoch_totals": self.host_totals(), "last_lr": self.last_lr,
                 "early_stopping": {"best": self.best_selected, "stale": self.stale_epochs,
                                    "select": self.stage.select}}
        return {**state, **{name: obj.state_dict() for name, obj in self.stateful().items()}}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """Put back ``trainer_state``; entries of objects not built yet (the scaler) wait for them."""
        if "rng" in state:
            set_rng_state(state["rng"])
        self.totals = [float(v) for v in state.get("epoch_totals", self.totals)]
        self._device_totals = None
        self.last_lr = state.get("last_lr", self.last_lr)
        early = state.get("early_stopping") or {}
        if early.get("select", "balanced") == self.stage.select:
            self.best_selected, self.stale_epochs = early.get("best"), int(early.get("stale", 0))
        else:  # saved before `select`, counting balanced accuracy: count the selected metric from the best so far
            self.best_selected, self.stale_epochs = self.best, 0
        own = ("rng", "epoch_totals", "last_lr", "early_stopping")
        self._restored = {k: v for k, v in state.items() if k not in own}
        self._load_restored()

    def improves(self, metrics: dict[str, Any]) -> bool:
        """Whether an epoch's metrics beat the stage's best selected metric (a new ``best.pt``)."""
        score = metrics.get(SELECTED_METRIC[self.stage.select])
        return score is not None and (self.best is None or score > self.best)

    def early_stop(self, score: float | None) -> bool:
        """Record an epoch's selected validation metric; True when ``patience`` epochs passed without a gain."""
        if score is not None and (self.best_selected is None or score > self.best_selected):
            self.best_selected, self.stale_epochs = score, 0
        else:
            self.stale_epochs += 1
        return bool(self.stage.patience) and self.stale_epochs >= self.stage.patience

    def _load_restored(self) -> None:
        for name, obj in self.stateful().items():
            if name in self._restored:
                obj.load_state_dict(self._restored.pop(name))

    def wrapped(self, prefixes: tuple[str, ...] | None, ctx: ddp.Dist,
                compile_model: bool) -> tuple[nn.Module, bool]:
        """(the module to train this epoch: frozen layers set, wrapped in DDP/compiled when asked; whether it
        was built anew)."""
        set_trainable(self.model, prefixes)
        fresh = self._wrapped is None or prefixes != self._prefixes
        if fresh:
            module: nn.Module = self.model
            if ctx.enabled:
                module = DistributedDataParallel(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
            self._wrapped = torch.compile(module) if compile_model else module
            self._prefixes = prefixes
        return self._wrapped, fresh

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and saved as best: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        if self._normalize is None:
            pre = self.data.preprocessing
            self._normalize = Normalizer(pre.mean, pre.std, self.channels_last).to(batch.device)
        return self._normalize(batch)

    def weights(self, device: torch.device) -> torch.Tensor | None:
        w = class_weights(self.data.train_counts, self.stage.imbalance, self.stage.cb_beta)
        return w.to(device) if w is not None else None

    def backward(self, loss: torch.Tensor, scaled: bool) -> None:
        """Backward and optimizer step (``scaled``: with a gradient scaler, for fp16 autocast)."""
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda", enabled=scaled)
            self._load_restored()
        self._scaler.scale(loss).backward()
        self._scaler.step(self.optimizer)
        self._scaler.update()


def host_floats(values: list[float | torch.Tensor]) -> list[float]:
    """Floats and 0-d tensors as floats, the tensors brought to the host in one transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    fetched = iter(torch.stack([t.float() for t in tensors]).tolist())
    return [next(fetched) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items() if v is not None}


def _epoch_line(label: str, epoch: int, epochs: int, m: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".4f") -> str:
        return format(m[key], fmt) if m.get(key) is not None else "-"

    return (f"{label} epoch {epoch}/{epochs}: train loss {f('train_loss')} acc {f('train_acc', '.3f')} | "
            f"val loss {f('val_loss')} acc {f('val_acc', '.3f')} balanced {f('val_balanced_acc', '.3f')} | "
            f"{f('images_per_s', '.1f')} img/s, {f('epoch_time_s', '.1f')} s")


def check_shard(label: str, images: int, world: int, smallest: int) -> None:
    """Refuse a process's share of one training image at 32 px or less: a batch of 1 with a 1x1 last feature map,
    which BatchNorm cannot normalise (the config refuses batch_size 1 there; a small set split over processes too)."""
    if images < 2 and smallest <= 32:
        raise TrainingFailed(f"{label} cannot train: each of the {world} training processes gets {images} training "
                             f"image, a batch of 1, which BatchNorm cannot normalise at {smallest} px; use fewer "
                             "processes, more images, or 33 px or more.")


def other_world(config: PipelineConfig, run_name: str, point: ResumePoint, world: int) -> str | None:
    """Why ``world`` processes cannot resume the run at ``point`` (its checkpoint was written by another number,
    and the sample order depends on it) and how to resume it; None when they can."""
    then = ((point.checkpoint or {}).get("sampler") or {}).get("world", world)
    if then == world:
        return None
    return (f"{stage_label(point.stage, config.stages[point.stage])} was checkpointed by {then} training "
            f"process{'es' * (then != 1)} and this resume has {world}: its sample order depends on that number, so "
            f"resume it with {then} ({resume_command(run_name, then)}).")


def resume_command(run_name: str, world: int, local: int | None = None) -> str:
    """The command that resumes a run checkpointed by ``world`` processes, ``local`` of them per node (this
    process's ``LOCAL_WORLD_SIZE`` when it is one of them; None: one node)."""
    if world == 1:
        return f"python -m train resume {run_name}"
    if local and 0 < local < world and world % local == 0:  # on each node, with the run's rendezvous options
        return (f"torchrun --nnodes={world // local} --nproc_per_node={local} --rdzv-backend=c10d "
                f"--rdzv-endpoint=HOST:PORT -m train resume {run_name}")
    return f"torchrun --nproc_per_node={world} -m train resume {run_name}"


def this_resume_command(run_name: str, ctx: ddp.Dist) -> str:
    """``resume_command`` for the processes of this run, as torchrun placed them."""
    return resume_command(run_name, ctx.world, int(os.environ.get("LOCAL_WORLD_SIZE") or ctx.world))


# --------------------------------------------------------------- entry point
def train_run(config: PipelineConfig, run_name: str, ctx: ddp.Dist, store: RunStore | None,
              resume: bool = False, show_progress: bool = True) -> str:
    """Run (or resume) ``run_name`` and record its final state; returns that state.

    ``finished`` or ``stopped`` return normally; a failure is recorded as ``failed`` with its
    message and re-raised (a ``UserError`` for problems the user can fix). The main process holds the run's
    trainer lock throughout (``train.trainer_lock``): another trainer of the run is refused before it writes.
    """
    with contextlib.ExitStack() as held:
        refusal = None
        if ctx.is_main:
            try:
                held.enter_context(trainer_lock(run_name))
            except RunStoreError as exc:
                refusal = str(exc)
        refusal = ddp.broadcast(ctx, refusal)  # every process of a refused trainer stops here, not at a collective
        if refusal is not None:
            raise RunStoreError(refusal)
        return _train_run(config, run_name, ctx, store, resume, show_progress)


def _train_run(config: PipelineConfig, run_name: str, ctx: ddp.Dist, store: RunStore | None, resume: bool,
               show_progress: bool) -> str:
    trainer = Trainer(config, run_name, ctx, store, show_progress)
    if store is not None and not ctx.enabled:  # under torchrun the other processes could not wait as long
        store.be_patient(STORE_PATIENCE_S, lambda text: print(text, file=sys.stderr, flush=True))
    main_store: Any = trainer.store
    before = main_store.get_run(run_name) if resume and store is not None else {}
    main_store.set_state(run_name, "running", pid=os.getpid())
    main_store.heartbeat(run_name, device=f"{ctx.device} x{ctx.world}" if ctx.enabled else str(ctx.device))
    beat = Heartbeat(store, run_name, trainer.progress, ctx.device) if (store is not None and ctx.is_main) else None
    if beat is not None:
        beat.start()
    try:
        try:
            trainer.run(resume=resume)
        except StopRequested:  # each ending is logged before the store says so: a reader of the state finds it
            trainer.display.message(f"Run {run_name} stopped; `{this_resume_command(run_name, ctx)}` continues it.")
            main_store.set_state(run_name, "stopped")
            return "stopped"
        except ResumeRefused:
            if before:
                state = "stopped" if before["stored_state"] in ("queued", "running") else before["stored_state"]
                main_store.set_state(run_name, state, error=before.get("error"))
            raise
        except UserError as exc:
            main_store.set_state(run_name, "failed", error=str(exc))
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: no save; resume starts from the last epoch's checkpoint
            trainer.display.message(f"Run {run_name} interrupted; `{this_resume_command(run_name, ctx)}` continues it "
                                    "from its last saved checkpoint.")
            main_store.set_state(run_name, "interrupted")
            raise
        except BaseException as exc:
            sentence = failure_sentence(exc, run_name, ctx)
            main_store.set_state(run_name, "failed", error=sentence or f"{type(exc).__name__}: {exc}")
            if sentence:
                raise UserError(sentence) from exc
            raise
        finally:
            if beat is not None:
                beat.stop()
        with trainer.stop.held(abort=False):  # trained: a stop changes nothing now, nor cuts the retention short
            if ctx.is_main:
                _apply_retention(config, run_name, main_store, trainer.display)
            trainer.display.message(f"Run {run_name} finished.")
            main_store.set_state(run_name, "finished")
        return "finished"
    finally:
        trainer.stop.restore()


def failure_sentence(exc: BaseException, run_name: str, ctx: ddp.Dist) -> str | None:
    """What happened and what to do, for the failures outside ResLens that a user can act on (None for others, which
    keep their traceback): torch.compile that cannot build the model, a DDP peer process that is gone."""
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        detail = (str(exc).strip() or "no detail").splitlines()[0][:200]
        return (f"torch.compile could not compile the model ({type(exc).__name__}: {detail}); run it again with "
                "compile: false (--set compile=false), or auto, which compiles on CUDA only.")
    if ctx.enabled and ddp.peer_gone(exc):
        return (f"Another training process of run {run_name} ended while this one waited for it (killed, out of "
                f"memory or crashed: torchrun's report names it); `{this_resume_command(run_name, ctx)}` continues "
                "from the last saved checkpoint.")
    return None


def _apply_retention(config: PipelineConfig, run_name: str, store: Any, display: Display) -> None:
    """``retention: final`` of a trained run; a failure keeps what it did not delete and says so (the run is
    finished all the same)."""
    from train.retention import apply_retention

    try:
        apply_retention(config, run_name, store)
    except (OSError, UserError) as exc:
        display.message(f"Retention stopped partway ({exc}); the earlier stages' checkpoints it did not delete "
                        "are kept.")


# ----------------------------------------------------------- checkpoint eval
@dataclass
class Evaluation:
    """What ``evaluate_checkpoint`` found (``result`` is a ``core.evaluation.class_result``)."""

    checkpoint: str
    dataset: str
    split: str
    result: dict[str, Any]
    misclassified: list[dict[str, Any]]
    id: int | None = None
    predictions: evaluation.Predictions | None = None


def split_changed(stored: dict[str, str], name: str, root: str | None, options: dict[str, Any], split: str,
                  labeled: Any) -> str | None:
    """What to know before trusting an evaluation on the data a checkpoint trained on, when its images changed since
    (``stored``: the checkpoint's ``LabeledImages.digest`` per split): a split drawn from the files again can move
    training images into validation."""
    if "train" not in stored:
        return None
    train = labeled if split == "train" else open_dataset(name, root, "train", **options)
    if train.digest(root) == stored["train"]:
        return None
    if split == "train":
        return ("The training images changed since this checkpoint was trained: these are not exactly the ones it "
                "learnt from.")
    if labeled.digest(root) == stored.get(split):
        return None
    return (f"The images of {name} changed since this checkpoint was trained (added, removed, renamed or moved): the "
            f"{split} split is no longer the one it was validated on and may hold images it trained on, so its "
            "figures may read high.")


def evaluate_checkpoint(path: str | os.PathLike[str], dataset: str | None = None, root: str | None = None,
                        split: str = "val", device: str | None = None, batch_size: int = 64,
                        store: RunStore | None = None, flip: bool | None = None,
                        image_size: int | None = None) -> Evaluation:
    """Per-class evaluation of any checkpoint on a split; stored in ``store`` when given.

    ``flip``: test-time flips (logits of each image and its mirror averaged); default: the stage's ``tta``.
    ``image_size``: the test resolution (resize to image_size / 0.875, centre-crop); default: the checkpoint's.

    The data set (and its root and options) defaults to the one the checkpoint was trained on;
    its classes must match the checkpoint's, or a ``CheckpointError`` says so.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    raw = load_checkpoint(path)
    info = checkpoint_info(path, raw)
    trained = raw.get("stage_config") or {}
    name = dataset or trained.get("dataset")
    if not name:
        raise UserError(f"Checkpoint {path} does not say which data set it was trained on; pass --dataset.")
    same = name == trained.get("dataset")
    options = dict(trained.get("options") or {}) if same else {}
    if root:  # resolved, as the trainer stores its own: the same split names the same image cache
        try:
            root = str(paths.typed_path(root, Path.cwd()))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if all((Path(root) / split_name).is_dir() for split_name in ("train", "val")):
            options = {k: v for k, v in options.items() if k not in SPLIT_OPTIONS}  # its folders are the split
    stored_root = not root and same and trained.get("root")
    root = root or (trained.get("root") if same else None)
    pre = info.preprocessing
    if image_size is not None:
        pre = pre.at_size(image_size)
    try:
        labeled = open_dataset(name, root, split, **options)
    except DatasetMissing as exc:
        if not stored_root:
            raise
        raise DatasetMissing(f"{exc} ({root} is where the checkpoint was trained, as it records; pass --root to "
                             "evaluate on the data set elsewhere.)") from None
    if len(labeled) == 0:
        raise UserError(f"The {split} split of {name} at {root} has no images: there is nothing to evaluate.")
    classes = list(labeled.class_labels)
    check_compatible(info, class_names=classes)  # before the split is decoded into the image cache
    trained_on = (same and bool(root) and bool(trained.get("root")) and options == (trained.get("options") or {})
                  and os.path.realpath(str(root)) == os.path.realpath(str(trained["root"])))
    note = split_changed(raw.get("images") or {}, name, root, options, split, labeled) if trained_on else None
    cached, labeled = open_cached_split(name, root, split, options, pre.resize, augmentation("none", pre.image_size),
                                        opened=labeled, crop=pre.image_size)
    if len(cached) == 0:
        raise UserError(f"Every image of the {split} split of {name} at {root} was unreadable and skipped: there is "
                        "nothing to evaluate.")
    target = ddp.pick_device(device)
    model = build_model(info.arch, info.num_classes, "scratch")
    load_weights(model, inference_weights(raw), path)
    normalize = Normalizer(pre.mean, pre.std).to(target)
    flip = bool(trained.get("tta")) if flip is None else flip
    preds = evaluation.predict(model.to(target), DataLoader(cached, batch_size=batch_size), target, prepare=normalize,
                               autocast_dtype=autocast_dtype(target), flip=flip)
    if isinstance(raw.get("train_counts"), list) and len(raw["train_counts"]) == len(classes):
        train_counts = list(raw["train_counts"])  # the images it learnt from, whichever data it is tested on now
    elif options.get("skip_unreadable"):  # older checkpoints: the train split now, less what its cache skipped
        train_counts = counts_without_skipped(name, root, options, info.preprocessing.resize,
                                              info.preprocessing.image_size)
    else:
        train_counts = list(class_counts(name, root, "train", **options).values())
    result = evaluation.class_result(classes, preds.confusion(len(classes)), train_counts, preds.top5_accuracy)
    result.update(loss=preds.loss, image_size=pre.image_size, flip=flip)  # how it was tested, shown with it
    wrong = evaluation.misclassified(preds, classes, cached.source, MISCLASSIFIED_KEPT)
    if note:
        result["note"] = note
    found = Evaluation(str(Path(path).resolve()), name, split, result, wrong, predictions=preds)
    if store is not None:
        found.id = store.add_evaluation(found.checkpoint, name, split, result, wrong, run=info.run_name)
    return found
