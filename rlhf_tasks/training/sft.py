"""Step 1, supervised fine-tuning: causal-LM loss on the responses of the SFT phase (prompt tokens masked unless
`sft.train_on_prompt`), perplexity on the eval split before and after.

From Python (no pipeline, spec or store): `fit(model, tokenizer, train_examples, eval_examples, SFTConfig(...))`.
Job entry: `run(spec)`."""
from __future__ import annotations

import math

import torch

from pathlib import Path

from ..config.stages import SFTConfig
from ..models import lm_logits, load_causal_lm, load_tokenizer, set_dropout
from .batches import eval_shards, join_truncate, pad_batch
from .distributed import all_reduce_sum, destroy_distributed, device, init_distributed, rank_world, seed_everything
from .engine import apply_lora
from .examples import load_examples, resolve_model_path, stage_setup
from .loop import StageTask, TrainResult, fit_task, run_training_stage


def build_sequences(prompts: list[list[int]], responses: list[list[int]], max_len: int,
                    train_on_prompt: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Input ids and labels (-100 where no loss is taken) per example."""
    seqs, labels = [], []
    for p, r in zip(prompts, responses):
        ids, n_prompt = join_truncate(p, r, max_len)
        seqs.append(ids)
        labels.append(list(ids) if train_on_prompt else [-100] * n_prompt + ids[n_prompt:])
    return seqs, labels


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL over labelled positions, their count) for one batch."""
    logits = lm_logits(model, batch["input_ids"], batch["attention_mask"]).float()
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    valid = target != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * valid).sum(), valid.sum()


class SFTTask:
    """Batches, loss and eval of SFT (the process group must be initialised)."""

    def __init__(self, tcfg: SFTConfig, tokenizer, train: dict, evals: dict):
        self.tcfg, self.tok = tcfg, tokenizer
        self.rank, self.world = rank_world()
        self.dev = device()
        self.train = build_sequences(train["prompt_ids"], train["chosen_ids"], tcfg.max_seq_len, tcfg.train_on_prompt)
        self.eval = build_sequences(evals["prompt_ids"], evals["chosen_ids"], tcfg.max_seq_len, tcfg.train_on_prompt)

    def batch(self, data, rows: list[int]) -> dict[str, torch.Tensor]:
        seqs, labels = data
        return pad_batch([seqs[i] for i in rows], self.tok.pad_token_id, [labels[i] for i in rows], self.dev)

    def loss(self, engine, rows: list[int]):
        total, count = token_nll(engine, self.batch(self.train, rows))
        return total / count.clamp(min=1), {}

    def tokens(self, rows: list[int]) -> int:
        return sum(len(self.train[0][i]) for i in rows)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        nll, count = 0.0, 0.0
        for rows, valid in eval_shards(len(self.eval[0]), self.tcfg.micro_batch_size, self.rank, self.world):
            batch = self.batch(self.eval, rows)
            batch["labels"][~torch.tensor(valid, device=self.dev)] = -100
            s, c = token_nll(engine, batch)
            nll, count = nll + s.item(), count + c.item()
        nll, count = all_reduce_sum([nll, count])
        loss = nll / max(count, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def sft_task(model, tokenizer, train_examples: dict, eval_examples: dict, tcfg: SFTConfig) -> StageTask:
    """The SFT `StageTask`: dropout (`tcfg.dropout`) and LoRA (`tcfg.lora`) applied to `model`, sequences and
    labels built from token ids {"prompt_ids": [[int]], "chosen_ids": [[int]]} (responses ending with EOS)."""
    init_distributed()
    set_dropout(model, tcfg.dropout)
    model.config.use_cache = False
    model = apply_lora(model, tcfg.lora)
    task = SFTTask(tcfg, tokenizer, train_examples, eval_examples)
    return StageTask(name="sft", tcfg=tcfg, model=model, tokenizer=tokenizer, n_train=len(task.train[0]),
                     loss=task.loss, evaluate=task.evaluate, tokens=task.tokens)


def fit(model, tokenizer, train_examples: dict, eval_examples: dict, config: SFTConfig | None = None, *,
        out_dir: str | Path | None = None) -> TrainResult:
    """Supervised fine-tuning from Python, without a pipeline, spec or store.

    `model`: a causal LM (`models.load_causal_lm(path)`); `tokenizer` with a pad token (`models.load_tokenizer`);
    examples: {"prompt_ids": [[int]], "chosen_ids": [[int]]} (token ids; responses end with EOS). Every
    `SFTConfig` field applies except checkpoints (`checkpoint_every`, `keep_checkpoints`), which need a store.
    Returns TrainResult(engine, summary, history); with `out_dir`, a plain HF folder + metrics.json land there."""
    config = config or SFTConfig()
    return fit_task(sft_task(model, tokenizer, train_examples, eval_examples, config), out_dir=out_dir)


def run(spec) -> dict:
    ctx = stage_setup(spec)
    tcfg = ctx.cfg.sft
    seed_everything(tcfg.seed)
    path = resolve_model_path(ctx.cfg.models.actor, ctx)
    tokenizer = load_tokenizer(path, padding_side="right")
    model = load_causal_lm(path, dtype=torch.float32)
    train = load_examples(ctx, "sft", "train", tokenizer)
    evals = load_examples(ctx, "sft", "eval", tokenizer)
    try:
        return run_training_stage(spec, sft_task(model, tokenizer, train, evals, tcfg))
    finally:
        destroy_distributed()
