"""Step 2, the reward model: a sequence-classification model with one scalar output (a causal-LM backbone gets a
new linear head; encoder classifiers work too), scored at the last real token of prompt + response, trained with
the pairwise loss -log sigmoid(r_chosen - r_rejected). Eval: accuracy, mean chosen/rejected score, margin.
The artifact is an AutoModelForSequenceClassification folder (num_labels=1) that `models.load_score_model` loads
with its head.

From Python (no pipeline, spec or store): `fit(score_model, tokenizer, train_examples, eval_examples,
RewardConfig(...))`. Job entry: `run(spec)`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pathlib import Path

from ..config.stages import RewardConfig
from ..models import load_score_model, load_tokenizer, set_dropout
from .batches import eval_shards, join_truncate, pad_batch
from .distributed import all_reduce_sum, destroy_distributed, device, init_distributed, rank_world, seed_everything
from .engine import ScoreHead, apply_lora
from .examples import load_examples, resolve_model_path, stage_setup
from .loop import StageTask, TrainResult, fit_task, run_training_stage


def pair_scores(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a pair batch laid out as [chosen..., rejected...] -> (r_chosen [B], r_rejected [B]).
    `engine` wraps a `ScoreHead(model, "sequence")`: the forward goes through the engine (ZeRO-3, checkpointing)."""
    scores = engine(batch["input_ids"], batch["attention_mask"]).float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r) (numerically stable)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class RewardTask:
    """Pair batches, loss and eval of the reward model (the process group must be initialised)."""

    def __init__(self, tcfg: RewardConfig, tokenizer, train: dict, evals: dict):
        self.tcfg, self.tok = tcfg, tokenizer
        self.rank, self.world = rank_world()
        self.dev = device()
        self.train = self._pairs(train)
        self.eval = self._pairs(evals)

    def _pairs(self, d: dict) -> list[tuple[list[int], list[int]]]:
        L = self.tcfg.max_seq_len
        return [(join_truncate(p, c, L)[0], join_truncate(p, r, L)[0])
                for p, c, r in zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"])]

    def batch(self, pairs, rows: list[int]) -> dict[str, torch.Tensor]:
        seqs = [pairs[i][0] for i in rows] + [pairs[i][1] for i in rows]
        return pad_batch(seqs, self.tok.pad_token_id, dev=self.dev)

    def loss(self, engine, rows: list[int]):
        rc, rr = pair_scores(engine, self.batch(self.train, rows))
        return pairwise_loss(rc, rr), {"accuracy": (rc > rr).float().mean().item()}

    def tokens(self, rows: list[int]) -> int:
        return sum(len(self.train[i][0]) + len(self.train[i][1]) for i in rows)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        sums = [0.0] * 6  # n, correct, sum chosen, sum rejected, sum loss, sum margin
        for rows, valid in eval_shards(len(self.eval), self.tcfg.micro_batch_size, self.rank, self.world):
            rc, rr = pair_scores(engine, self.batch(self.eval, rows))
            v = torch.tensor(valid, dtype=torch.float32, device=rc.device)
            losses = -F.logsigmoid(rc - rr)
            for j, x in enumerate([v, (rc > rr).float() * v, rc * v, rr * v, losses * v, (rc - rr) * v]):
                sums[j] += x.sum().item()
        n, correct, sc, sr, sl, sm = all_reduce_sum(sums)
        n = max(n, 1.0)
        return {"accuracy": correct / n, "mean_chosen": sc / n, "mean_rejected": sr / n, "margin": sm / n,
                "loss": sl / n}


def reward_task(model, tokenizer, train_examples: dict, eval_examples: dict, tcfg: RewardConfig) -> StageTask:
    """The reward-model `StageTask`: dropout and LoRA (`tcfg.lora`) applied to the score model, which is wrapped in
    a `ScoreHead` (its engine forward returns the scores); pairs built from token ids {"prompt_ids", "chosen_ids",
    "rejected_ids": [[int]]} (responses ending with EOS)."""
    init_distributed()
    set_dropout(model, tcfg.dropout)
    model.config.use_cache = False
    model = ScoreHead(apply_lora(model, tcfg.lora), "sequence")
    task = RewardTask(tcfg, tokenizer, train_examples, eval_examples)
    return StageTask(name="reward", tcfg=tcfg, model=model, tokenizer=tokenizer, n_train=len(task.train),
                     loss=task.loss, evaluate=task.evaluate, tokens=task.tokens)


def fit(model, tokenizer, train_examples: dict, eval_examples: dict, config: RewardConfig | None = None, *,
        out_dir: str | Path | None = None) -> TrainResult:
    """Train a reward model from Python, without a pipeline, spec or store.

    `model`: a score model (`models.load_score_model(path)`: a causal-LM folder gets a new scalar head);
    `tokenizer` with a pad token; examples: {"prompt_ids", "chosen_ids", "rejected_ids": [[int]]} (token ids;
    responses end with EOS). Every `RewardConfig` field applies except checkpoints, which need a store
    (`head_init_std` is read by `load_score_model`). Returns TrainResult(engine, summary, history); with `out_dir`,
    an HF sequence-classification folder + metrics.json land there."""
    config = config or RewardConfig()
    return fit_task(reward_task(model, tokenizer, train_examples, eval_examples, config), out_dir=out_dir)


def run(spec) -> dict:
    ctx = stage_setup(spec)
    tcfg = ctx.cfg.reward
    seed_everything(tcfg.seed)
    models = ctx.cfg.models
    path = resolve_model_path(models.reward or models.actor, ctx)
    tokenizer = load_tokenizer(path, padding_side="right")
    model = load_score_model(path, dtype=torch.float32, head_init_std=tcfg.head_init_std)
    cols = ("chosen", "rejected")
    train = load_examples(ctx, "reward", "train", tokenizer, cols)
    evals = load_examples(ctx, "reward", "eval", tokenizer, cols)
    try:
        return run_training_stage(spec, reward_task(model, tokenizer, train, evals, tcfg))
    finally:
        destroy_distributed()
