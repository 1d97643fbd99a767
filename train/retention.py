"""What a finished run keeps on disk (the pipeline's ``retention``): ``all`` keeps every stage's ``best.pt`` and
``last.pt``; ``final`` deletes the checkpoints of every stage but the last once the run has finished (nothing
resumes a finished run, and later stages have already started from them). Metrics stay in the run store."""
from __future__ import annotations

from typing import Any

from train.config import PipelineConfig
from train.engine import stage_dir


def apply_retention(config: PipelineConfig, run_name: str, store: Any) -> int:
    """Delete what ``config.retention`` does not keep of finished run ``run_name``; returns the bytes freed."""
    if config.retention != "final":
        return 0
    freed = 0
    for index, stage in enumerate(config.stages[:-1]):
        for checkpoint in stage_dir(run_name, index, stage).glob("*.pt"):
            freed += checkpoint.stat().st_size
            checkpoint.unlink()
        store.update_stage(run_name, index, best_path=None, last_path=None)
    return freed
