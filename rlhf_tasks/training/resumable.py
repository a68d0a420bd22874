"""The one resumable-run helper of the stage jobs (SFT, the reward model and PPO all use it), and `LocalRun`, the
same interface for a run from Python without a spec or store (nothing to resume, no checkpoints).

    run = ResumableRun(spec, "sft", total_steps, keep=tcfg.keep_checkpoints, every=tcfg.checkpoint_every)
    state = run.resume(engines)                  # None: start fresh; else the saved state (history restored)
    for step in range(run.start_step + 1, total_steps + 1):
        ...; run.logger.log(step, metrics)
        if run.checkpoint_due(step):             # every `every` steps, never at the last
            run.checkpoint(step, engines, {...})
    ...write the HF folder(s) into run.out_dir...
    run.commit(summary)                          # metrics.json, the stage artifact, then its checkpoints deleted
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointManager
from .distributed import barrier, rank_world
from .metrics import MetricsLogger


class ResumableRun:
    """One stage job's run: a fresh output folder (`<run_dir>/output`), the stage's checkpoints in the store
    (`ckpt-<stage>/<key>.step-N`), the metrics logger, and the commit. All ranks create and call it."""

    def __init__(self, spec, name: str, total_steps: int, keep: int, every: int = 0, started: float | None = None,
                 store=None):
        self.spec, self.name, self.total_steps, self.every = spec, name, total_steps, every
        self.started = started if started is not None else time.time()
        self.rank, self.world = rank_world()
        run_dir = Path(spec.run_dir or ".")
        self.out_dir = run_dir / "output"
        if self.rank == 0:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            self.out_dir.mkdir(parents=True)
        barrier()
        self.store = store if store is not None else spec.open_store()
        self.checkpoints = CheckpointManager(self.store, spec.stage, spec.key,
                                             staging_dir=run_dir / "checkpoint-staging", keep=keep)
        self.logger = MetricsLogger(self.out_dir, self.rank, prefix=name, total_steps=total_steps)
        self.start_step, self.elapsed_before = 0, 0.0

    def resume(self, engines: dict[str, Any]) -> dict | None:
        """Restore `engines` from the newest loadable checkpoint and take over its history; returns its state
        (what `checkpoint` was given), or None when the run starts fresh."""
        found = self.checkpoints.restore(engines)
        if found is None:
            return None
        self.start_step, state = found
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.logger.restore(state["history"])
        if self.rank == 0:
            print(f"[{self.name}] resumed from checkpoint step {self.start_step} of {self.total_steps}", flush=True)
        return state

    def elapsed_s(self) -> float:
        """Wall time of the whole run, across resumes."""
        return self.elapsed_before + time.time() - self.started

    def checkpoint_due(self, step: int) -> bool:
        """Whether `step` ends with a checkpoint: every `every` steps (0: never), except the last (the commit
        follows it)."""
        return bool(self.every) and step % self.every == 0 and step != self.total_steps

    def checkpoint(self, step: int, engines: dict[str, Any], state: dict) -> None:
        """Commit a checkpoint of `engines` with the caller's `state` (plus the history and elapsed time)."""
        self.checkpoints.save(step, engines, {**state, "history": self.logger.history, "elapsed_s": self.elapsed_s()})

    def commit(self, summary: dict) -> None:
        """Write metrics.json, commit the output folder as the stage artifact (rank 0), then delete the run's
        checkpoints: the artifact exists, they are garbage."""
        from ..stages import commit_stage_output

        self.logger.write(self.out_dir / "metrics.json", summary)
        self.logger.close()
        if self.rank == 0:
            uri = commit_stage_output(self.spec, self.out_dir, summary)
            print(f"[{self.name}] committed {uri}", flush=True)
            for old in self.checkpoints.steps():
                self.store.delete(self.checkpoints.kind, self.checkpoints.tag(old))
        barrier()


class LocalRun:
    """A run without a spec or store (`sft.fit` / `reward.fit` from Python), behind `ResumableRun`'s interface:
    it starts fresh and never checkpoints; `commit` writes metrics.json into `out_dir` (when given: the HF folder
    goes there too) instead of committing an artifact."""

    start_step = 0

    def __init__(self, name: str, total_steps: int, out_dir: str | Path | None = None, started: float | None = None):
        self.rank, self.world = rank_world()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.started = started if started is not None else time.time()
        self.logger = MetricsLogger(self.out_dir, self.rank, prefix=name, total_steps=total_steps)

    def resume(self, engines: dict[str, Any]) -> None:  # noqa: ARG002 - nothing to resume from
        return None

    def checkpoint_due(self, step: int) -> bool:  # noqa: ARG002 - checkpoints need a store
        return False

    def elapsed_s(self) -> float:
        return time.time() - self.started

    def commit(self, summary: dict) -> None:
        if self.out_dir is not None:
            self.logger.write(self.out_dir / "metrics.json", summary)
        self.logger.close()
        barrier()
