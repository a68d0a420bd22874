"""The shared step loop of SFT and the reward model: deterministic sharded batches, periodic eval, final eval, the
HF folder and metrics.json. As a stage job (`run_training_stage`) it resumes from and writes checkpoints and commits
the stage artifact; from Python (`fit_task`, behind `sft.fit` / `reward.fit`) it needs neither a spec nor a store."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError
from .batches import epoch_permutation, micro_batch_indices
from .distributed import all_reduce_sum, init_distributed, rank_world, seed_rank_streams
from .engine import build_engine
from .export import save_hf
from .metrics import peak_memory_mb
from .resumable import LocalRun, ResumableRun


@dataclass
class StageTask:
    """What a stage plugs into `fit_task` / `run_training_stage`.

    `loss(engine, rows)` returns (loss tensor, {name: float}) for one micro-batch of training rows (indices);
    `evaluate(engine)` runs the full eval on all ranks and returns reduced metrics (same on every rank);
    `tokens(rows)` counts real tokens of a micro-batch (throughput)."""

    name: str
    tcfg: Any
    model: torch.nn.Module
    tokenizer: Any
    n_train: int
    loss: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Any], dict[str, float]]
    tokens: Callable[[list[int]], int]


def plan_steps(tcfg, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for `n_train` rows."""
    per_step = tcfg.micro_batch_size * tcfg.grad_accum * world
    spe = n_train // per_step
    if spe == 0:
        raise DataError(f"training split: {n_train} rows, but one optimizer step needs {per_step} "
                        f"(micro_batch_size x grad_accum x processes)")
    total = spe * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    return spe, total


@dataclass
class TrainResult:
    """What `fit_task` returns: the trained DeepSpeed engine (`plain_hf_model(result.engine)` is the HF model), the
    flat summary (eval before/after, final train loss, steps, throughput) and the per-step history."""

    engine: Any
    summary: dict
    history: list[dict]


def run_training_stage(spec, task: StageTask) -> dict:
    """Train `task` as the stage job of `spec`: resume from the latest loadable checkpoint of `spec.key`, checkpoint
    every `checkpoint_every` steps, commit the HF folder + metrics.json as the stage artifact. Returns the summary."""
    return fit_task(task, spec=spec).summary


def fit_task(task: StageTask, *, spec=None, out_dir: str | Path | None = None) -> TrainResult:
    """Train `task` under DeepSpeed: evaluate first (or resume, as a stage job), then the step loop with periodic
    eval (and checkpoints, as a stage job); final eval. With `spec` (a stage job) the output goes into the run folder
    and is committed; otherwise into `out_dir` when given (an HF folder + metrics.json + TensorBoard events)."""
    t_start = time.time()
    tcfg = task.tcfg
    init_distributed()
    rank, world = rank_world()
    spe, total = plan_steps(tcfg, task.n_train, world)
    engine = build_engine(task.model, tcfg, total_steps=total, world_size=world)
    if spec is not None:
        run = ResumableRun(spec, task.name, total, tcfg.keep_checkpoints, every=tcfg.checkpoint_every,
                           started=t_start)
    else:
        run = LocalRun(task.name, total, out_dir, started=t_start)
    logger = run.logger
    state = run.resume({"model": engine})
    if state is not None:
        eval_before = state["eval_before"]
    else:
        seed_rank_streams(tcfg.seed)  # dropout
        engine.eval()
        eval_before = task.evaluate(engine)
        logger.log(0, {f"eval/{k}": v for k, v in eval_before.items()})

    start_step = run.start_step
    tokens_done, train_time = 0, 0.0
    last = {}
    for step in range(start_step + 1, total + 1):
        epoch, pos = divmod(step - 1, spe)
        perm = epoch_permutation(task.n_train, tcfg.seed, epoch)
        engine.train()
        t0 = time.time()
        lr = engine.get_lr()[0] if engine.lr_scheduler is not None else tcfg.optim.lr
        sums: dict[str, float] = {}
        ntok = 0
        for micro in range(tcfg.grad_accum):
            rows = micro_batch_indices(perm, pos, micro, tcfg.micro_batch_size, tcfg.grad_accum, world, rank)
            loss, extra = task.loss(engine, rows)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.item(), **extra}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            ntok += task.tokens(rows)
        names = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in names] + [float(ntok)])
        dt = time.time() - t0
        train_time += dt
        tokens_done += int(reduced[-1])
        last = {k: v / (tcfg.grad_accum * world) for k, v in zip(names, reduced)}
        if step % tcfg.log_every == 0 or step == total:
            gn = engine.get_global_grad_norm()
            row = {**last, "lr": lr, "tokens_per_s": reduced[-1] / max(dt, 1e-9), "epoch": epoch}
            if gn is not None:
                row["grad_norm"] = float(gn)
            logger.log(step, row)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
            engine.eval()
            logger.log(step, {f"eval/{k}": v for k, v in task.evaluate(engine).items()})
        if run.checkpoint_due(step):
            run.checkpoint(step, {"model": engine}, {"eval_before": eval_before, "epoch": epoch, "position": pos + 1})
    engine.eval()
    eval_after = task.evaluate(engine)
    logger.log(total, {f"eval/{k}": v for k, v in eval_after.items()})
    if run.out_dir is not None:
        save_hf(engine, task.tokenizer, run.out_dir, rank, keep_adapter=tcfg.lora.r > 0 and not tcfg.lora.merge)
    wall_s = run.elapsed_s()
    summary: dict[str, Any] = {"steps": total, "resumed_from_step": start_step, "world_size": world,
                               "wall_s": round(wall_s, 3),
                               "train_tokens_per_s": round(tokens_done / train_time, 2) if train_time else 0.0,
                               "peak_mem_mb": round(peak_memory_mb(), 1)}
    if "loss" in last:
        summary["train_loss_final"] = last["loss"]
    for k, v in eval_before.items():
        summary[f"eval_{k}_before"] = v
    for k, v in eval_after.items():
        summary[f"eval_{k}"] = v
    run.commit(summary)
    return TrainResult(engine, summary, logger.history)
