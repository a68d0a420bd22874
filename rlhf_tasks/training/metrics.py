"""Metrics: progress lines on stdout, the in-memory history, TensorBoard events, metrics.json, peak memory."""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import numpy as np
import torch


class MetricsLogger:
    """Progress lines on stdout, an in-memory history, TensorBoard events under `out_dir/tensorboard` (rank 0;
    none without an `out_dir`)."""

    def __init__(self, out_dir: str | Path | None, rank: int, prefix: str = "", total_steps: int | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank, self.prefix, self.total_steps = rank, prefix, total_steps
        self.history: list[dict] = []
        self._tb = None if self.out_dir is not None else False

    def _writer(self):
        if self._tb is None and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = False
        return self._tb or None

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.rank != 0:
            return
        tb = self._writer()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    tb.add_scalar(k, v, step)
            tb.flush()
        if echo:
            of = f"/{self.total_steps}" if self.total_steps else ""
            body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            print(f"[{self.prefix}] step {step}{of} {body}", flush=True)

    def restore(self, history: list[dict]) -> None:
        """Continue a resumed run: take over its history and replay it into TensorBoard."""
        for row in history:
            row = dict(row)
            self.log(row.pop("step"), row, echo=False)

    def write(self, path: str | Path, summary: dict, **extra) -> None:
        if self.rank != 0:
            return
        Path(path).write_text(json.dumps({"summary": summary, "history": self.history, **extra}, indent=1))

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def peak_memory_mb() -> float:
    """Peak memory of this process: accelerator memory if any, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20
