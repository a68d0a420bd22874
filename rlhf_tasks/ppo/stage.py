"""Step 3 as a stage job: PPO, GRPO or RLOO with the hybrid engine, resumable. Job entry: `run(spec)` (world size
1..N). The stage's name is the method (`spec.stage`: ppo, grpo, rloo); grpo and rloo build no critic
(`trainer.CriticFreeTrainer`).

Inputs (spec.inputs): `data` (prompts: the ppo/train split), `sft` (actor + reference), `reward` (reward model and,
for PPO by default, the critic's initial weights; absent when step 3 scores with `ppo.reward_fn` alone and needs no
reward model: `config.rules.needs_reward_model`). Output artifact:
    actor/         HF causal-LM folder of the trained policy (+ tokenizer)
    ema/           the EMA of the actor, when ppo.ema_decay is set
    metrics.json   {"summary": {...flat...}, "history": [{"step": n, ...every PPO metric...}, ...]}
Checkpoints (every ppo.checkpoint_every steps) hold the actor and (PPO) critic engines (weights, optimizers,
schedulers), the EMA, the KL controller, the prompt-loader position (the step: batches are a pure function of seed and step) and
the RNG states of every rank, so a killed job resumed from its latest checkpoint continues the same run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config.rules import needs_reward_model
from ..errors import ConfigError, DataError
from ..models import load_tokenizer
from ..reward_fn import ROW_FIELDS
from ..training.batches import epoch_permutation, micro_batch_indices
from ..training.distributed import destroy_distributed, local_first, seed_rank_streams
from ..training.examples import stage_setup
from ..training.metrics import peak_memory_mb
from ..training.resumable import ResumableRun
from .engine import RLHFEngine
from .trainer import CriticFreeTrainer, PPOTrainer

SUMMARY_KEYS = ("reward/score_mean", "gold/mean", "kl/ref", "entropy", "response/length", "response/eos_rate",
                "value/explained_variance", "policy/clipfrac", "policy/approx_kl", "kl/coef", "reward/fn_mean",
                "reward/group_std", "policy/kl_loss")
METHODS = ("ppo", "grpo", "rloo")  # the stage names this module runs (the step-3 method)


class PromptSchedule:
    """Deterministic prompt batches: experience step s (1-based) of rank r takes `generation_batches` batches of
    `prompt_batch_size` rows from the seeded permutation of its epoch. The loader position is the step itself."""

    def __init__(self, n: int, batch: int, gen_batches: int, world: int, rank: int, seed: int):
        self.n, self.batch, self.gen_batches, self.world, self.rank, self.seed = n, batch, gen_batches, world, rank, seed
        self.steps_per_epoch = n // (batch * gen_batches * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"ppo/train: {n} prompts, but one PPO step needs {batch * gen_batches * world} "
                            f"(prompt_batch_size x generation_batches x processes)")

    def rows(self, step: int) -> list[list[int]]:
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        perm = epoch_permutation(self.n, self.seed, epoch)
        return [micro_batch_indices(perm, pos, g, self.batch, self.gen_batches, self.world, self.rank)
                for g in range(self.gen_batches)]


def load_prompts(data_dir: Path, split: str = "train", row_fields: bool = False) -> dict[str, list]:
    """The ppo phase's prompts: prompt_ids, prompt, gold, chosen_ids (ptx targets; may be null), and with
    `row_fields` the columns a reward function may take (reward_fn.ROW_FIELDS)."""
    from ..data.artifact import load_phase

    ds = load_phase(data_dir, "ppo", split)
    extra = [c for c in ROW_FIELDS if c not in ("gold",) and c in ds.column_names] if row_fields else []
    cols = ds.select_columns(["prompt", "prompt_ids", "gold", "chosen_ids", *extra]).to_dict()
    if not cols["prompt_ids"]:
        raise DataError(f"{data_dir}: ppo/{split} has no prompts")
    return cols


def check_same_vocab(actor_tok, reward_dir: str) -> None:
    """The reward model scores the actor's token ids, so both must share one tokenizer."""
    rtok = load_tokenizer(reward_dir)
    probe = " Human: Describe the cat. Assistant: the cat is warm"
    if len(rtok) != len(actor_tok) or rtok(probe)["input_ids"] != actor_tok(probe)["input_ids"]:
        raise ConfigError("ppo: the reward model's tokenizer differs from the actor's; PPO scores the actor's tokens "
                          "with the reward model, so both must share one vocabulary (models.reward)")


def make_batch(cols: dict[str, list], rows: list[int], with_ptx: bool) -> dict[str, list]:
    batch = {"prompt_ids": [cols["prompt_ids"][i] for i in rows], "prompt": [cols["prompt"][i] for i in rows],
             "gold": [cols["gold"][i] for i in rows]}
    for k in ROW_FIELDS:  # loaded only when a reward function scores (load_prompts' row_fields)
        if k in cols and k not in batch:
            batch[k] = [cols[k][i] for i in rows]
    if with_ptx:
        batch["chosen_ids"] = [cols["chosen_ids"][i] for i in rows]
    return batch


def summarize(history: list[dict], total: int, start_step: int, world: int, wall_s: float) -> dict[str, Any]:
    """Flat summary: first-step and final values (mean of the last quarter of steps) of the main metrics."""
    rows = [r for r in history if "reward/score_mean" in r]
    out: dict[str, Any] = {"steps": total, "resumed_from_step": start_step, "world_size": world,
                           "wall_s": round(wall_s, 3)}
    if not rows:
        return out
    tail = rows[-max(1, len(rows) // 4):]
    for k in SUMMARY_KEYS:
        name = k.replace("/", "_")
        if k in rows[0]:
            out[f"{name}_first"] = rows[0][k]
        vals = [r[k] for r in tail if k in r]
        if vals:
            out[f"{name}_final"] = sum(vals) / len(vals)
    out["gen_compile_s"] = round(sum(r.get("time/gen_compile_s", 0.0) for r in rows), 3)
    for k in ("time/step_s", "time/generation_s", "time/train_s", "gen/tokens_per_s", "gen/decode_tokens_per_s",
              "samples_per_s"):
        vals = sorted(r[k] for r in rows if k in r)
        if vals:
            out[f"{k.replace('/', '_')}_median"] = vals[len(vals) // 2]
    return out


def run(spec) -> dict:
    ctx = stage_setup(spec)
    try:
        return train_ppo(spec, ctx)
    finally:
        destroy_distributed()


def make_trainer(method: str, engine, cfg, advantage_sign: float = 1.0):
    """The step-3 trainer of a method: PPOTrainer (ppo) or CriticFreeTrainer (grpo, rloo)."""
    if method == "ppo":
        return PPOTrainer(engine, cfg, advantage_sign=advantage_sign)
    return CriticFreeTrainer(engine, cfg, estimator=method, advantage_sign=advantage_sign)


def train_ppo(spec, ctx) -> dict:
    t_start = time.time()
    method = spec.stage
    if method not in METHODS:
        raise ConfigError(f"stage {method!r} is not a step-3 method ({', '.join(METHODS)})")
    cfg = ctx.cfg.ppo
    rank, world, store = ctx.rank, ctx.world, ctx.store
    sft_dir = str(local_first(lambda: store.get_uri(spec.inputs["sft"])))
    reward_dir = None
    if needs_reward_model(method, cfg):
        if "reward" not in spec.inputs:
            raise DataError(f"{method} stage spec has no reward input (ppo.reward={cfg.reward})")
        reward_dir = str(local_first(lambda: store.get_uri(spec.inputs["reward"])))
    tokenizer = load_tokenizer(sft_dir, padding_side="left")
    if reward_dir is not None:
        check_same_vocab(tokenizer, reward_dir)
    cols = load_prompts(ctx.data_dir, row_fields=cfg.reward != "rm")
    sched = PromptSchedule(len(cols["prompt_ids"]), cfg.prompt_batch_size, cfg.generation_batches, world, rank,
                           cfg.seed)
    total = cfg.total_steps or sched.steps_per_epoch * cfg.epochs
    with_ptx = cfg.ptx_coef > 0

    engine = RLHFEngine(sft_dir, reward_dir, tokenizer=tokenizer, config=cfg, total_steps=total, world_size=world,
                        with_critic=method == "ppo")
    trainer = make_trainer(method, engine, cfg)
    if rank == 0:
        print(f"[{method}] generation: {engine.hybrid.choice}", flush=True)

    resumable = ResumableRun(spec, method, total, cfg.keep_checkpoints, every=cfg.checkpoint_every,
                             started=t_start, store=store)
    state = resumable.resume(engine.trainable_engines())
    if state is not None:
        trainer.load_state_dict(state["trainer"])
    else:
        seed_rank_streams(cfg.seed)  # sampling

    for step in range(resumable.start_step + 1, total + 1):
        batches = [make_batch(cols, rows, with_ptx) for rows in sched.rows(step)]
        stats = trainer.step(batches)
        stats["epoch"] = (step - 1) // sched.steps_per_epoch
        resumable.logger.log(step, stats, echo=step % cfg.log_every == 0 or step == total)
        if resumable.checkpoint_due(step):
            resumable.checkpoint(step, engine.trainable_engines(), {"trainer": trainer.state_dict(), "position": step})

    engine.save_actor(resumable.out_dir / "actor")
    if engine.ema is not None:
        engine.ema.save_hf(tokenizer, resumable.out_dir / "ema")
    summary = summarize(resumable.logger.history, total, resumable.start_step, world, resumable.elapsed_s())
    summary["peak_mem_mb"] = round(peak_memory_mb(), 1)
    resumable.commit(summary)  # then its checkpoints are deleted, as for SFT and the reward model
    return summary
