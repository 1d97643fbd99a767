"""Running the same trainer on one process or under ``torchrun`` (DistributedDataParallel).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; ``setup`` then joins the process group
(``nccl`` on CUDA, ``gloo`` otherwise). Only rank 0 (``Dist.is_main``) writes the run store and
checkpoints. ``ShardedSampler`` is the one sampler of the trainer: a per-epoch, seeded order
(uniform shuffle or class-weighted draws), split between ranks like ``DistributedSampler``, that
can start mid-epoch so a resumed run sees exactly the batches it had not seen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``requested`` (cpu, cuda, mps) or the best available; CUDA gets this process's GPU."""
    from core.errors import UserError

    name = requested or ("cuda" if torch.cuda.is_available() else
                         "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this PyTorch has no MPS support here.")
    if name not in ("cpu", "mps"):
        raise UserError(f"Unknown device {name!r}; choose cpu, cuda or mps.")
    return torch.device(name)


def setup(requested_device: str | None = None) -> Dist:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(requested_device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # what gloo says of a process that ended


def peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the group is gone (killed, out of
    memory, crashed): gloo raises a plain RuntimeError saying so, NCCL a ``DistNetworkError``."""
    network = getattr(dist, "DistNetworkError", ())
    return isinstance(exc, network) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_GONE))


def teardown(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def all_sum(ctx: Dist, values: Sequence[float]) -> list[float]:
    """Sum ``values`` over all ranks (identity on one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if ctx.device.type == "cuda":
        tensor = tensor.to(ctx.device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast(ctx: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardedSampler(Sampler[int]):
    """Seeded per-epoch order of ``n`` indices (shuffled, or drawn with ``weights``), this rank's share.

    Every rank yields ``len(self)`` indices; ``start`` skips the first indices of the shard (resume).
    With ``seeded``, it yields ``(index, seed)`` pairs instead, the seed derived from (seed, epoch,
    position in the epoch's order) for ``train.reproducible.SeededItems``.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 weights: Sequence[float] | None = None, seeded: bool = False) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.seeded = seeded
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch, self.start = 0, 0
        self.per_rank = -(-n // world)  # ceil: pad by repeating, as DistributedSampler does

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is not None:
            return torch.multinomial(self.weights, total, replacement=True, generator=g)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return torch.cat([order, order[: total - self.n]]) if total > self.n else order

    def indices(self) -> list[int]:
        """This rank's remaining indices of the epoch, in order (what ``__iter__`` yields, without seeds)."""
        return self._order()[self.rank::self.world][self.start:].tolist()

    def seed_at(self, k: int) -> int:
        """The seed of the ``k``-th remaining index (position ``(start + k) * world + rank`` of the epoch's order)."""
        from train.reproducible import sample_seed

        return sample_seed(self.seed, self.epoch, (self.start + k) * self.world + self.rank)

    def __iter__(self) -> Iterator[Any]:
        shard = self.indices()
        if not self.seeded:
            return iter(shard)
        return iter((index, self.seed_at(k)) for k, index in enumerate(shard))

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "n": self.n, "world": self.world}
