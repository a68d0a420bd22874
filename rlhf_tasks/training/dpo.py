"""Method dpo: direct preference optimisation of the SFT policy on the reward phase's preference pairs (Rafailov et
al. 2023), with the SFT policy as the reference; no reward model is trained on or read. Loss: sigmoid DPO (with
label smoothing: conservative DPO) or IPO on the pair's log-ratio (`dpo_math`). Metrics on the training batches and
on the held-out reward/eval pairs: loss, implicit-reward accuracy and margin, the policy's chosen/rejected log-probs
and implicit rewards. The step loop, engine, LoRA, checkpoints and the artifact (a plain HF causal-LM folder, which
evaluation and `rlhf chat` load like SFT's) are the supervised stages' (`loop.fit_task`).

The reference (`dpo.reference`): the policy with its LoRA adapters disabled (no second model), a frozen copy of the
SFT policy (ZeRO-3 partitioned when the policy is), or its log-probs of every pair computed once before training.

From Python (no pipeline, spec or store): `fit(model, tokenizer, train_examples, eval_examples, DPOConfig(...))`.
Job entry: `run(spec)`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from ..config.stages import DPOConfig
from ..errors import DataError
from ..models import lm_logits, load_causal_lm, load_tokenizer, set_dropout
from . import dpo_math as dm
from .batches import eval_shards, pad_batch
from .distributed import (all_reduce_sum, destroy_distributed, device, init_distributed, rank_world,
                          seed_everything)
from .engine import apply_lora, build_engine, trained_module
from .examples import load_examples, resolve_model_path, stage_setup
from .loop import StageTask, TrainResult, fit_task, run_training_stage
from .sft import build_sequences

# a reference: (policy engine, split, pair rows, their batch) -> reference log-probs [2B], chosen then rejected
Reference = Callable[[object, str, list[int], dict[str, torch.Tensor]], torch.Tensor]
PAIR_METRICS = ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected")


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-prob of each sequence's response (labels != -100) under `model` (an engine or a module).
    batch of [2B, T] -> [2B]"""
    logits = lm_logits(model, batch["input_ids"], batch["attention_mask"]).float()
    return dm.sequence_logprobs(logits, batch["input_ids"], batch["labels"] != -100)


def pair_terms(logp: torch.Tensor, ref_logp: torch.Tensor, tcfg: DPOConfig) -> dict[str, torch.Tensor]:
    """Per pair loss and metrics (`PAIR_METRICS`) from the policy's and the reference's log-probs laid out as
    [chosen..., rejected...]. [2B], [2B] -> {name: [B]}"""
    half = logp.shape[0] // 2
    lc, lr, rc, rr = logp[:half], logp[half:], ref_logp[:half], ref_logp[half:]
    h = dm.preference_logratio(lc, lr, rc, rr)
    loss = (dm.sigmoid_loss(h, tcfg.beta, tcfg.label_smoothing) if tcfg.loss == "sigmoid"
            else dm.ipo_loss(h, tcfg.beta))
    reward_c, reward_r = dm.implicit_rewards(lc, rc, tcfg.beta), dm.implicit_rewards(lr, rr, tcfg.beta)
    return {"loss": loss, "accuracy": dm.reward_accuracy(reward_c, reward_r),
            "margin": dm.reward_margin(reward_c, reward_r), "logp_chosen": lc, "logp_rejected": lr,
            "reward_chosen": reward_c, "reward_rejected": reward_r}


class DPOTask:
    """Pair batches, loss and eval of DPO (the process group must be initialised; `reference` set before use)."""

    def __init__(self, tcfg: DPOConfig, tokenizer, train: dict, evals: dict):
        self.tcfg, self.tok = tcfg, tokenizer
        self.rank, self.world = rank_world()
        self.dev = device()
        self.splits = {"train": self._pairs(train), "eval": self._pairs(evals)}
        self.reference: Reference | None = None

    def _pairs(self, d: dict) -> tuple[tuple[list, list], tuple[list, list]]:
        """(chosen (ids, labels), rejected (ids, labels)): prompt tokens labelled -100, as SFT's sequences."""
        L = self.tcfg.max_seq_len
        return (build_sequences(d["prompt_ids"], d["chosen_ids"], L, False),
                build_sequences(d["prompt_ids"], d["rejected_ids"], L, False))

    def n(self, split: str) -> int:
        return len(self.splits[split][0][0])

    def batch(self, split: str, rows: list[int]) -> dict[str, torch.Tensor]:
        """The pairs `rows` of `split` as one batch laid out as [chosen..., rejected...] (input_ids, attention_mask,
        labels: [2B, T])."""
        (c_ids, c_lab), (r_ids, r_lab) = self.splits[split]
        seqs = [c_ids[i] for i in rows] + [r_ids[i] for i in rows]
        labels = [c_lab[i] for i in rows] + [r_lab[i] for i in rows]
        return pad_batch(seqs, self.tok.pad_token_id, labels, self.dev)

    def terms(self, engine, split: str, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = self.batch(split, rows)
        logp = response_logprobs(engine, batch)
        with torch.no_grad():
            ref = self.reference(engine, split, rows, batch).to(logp.device, logp.dtype)
        return pair_terms(logp, ref, self.tcfg)

    def loss(self, engine, rows: list[int]):
        t = self.terms(engine, "train", rows)
        return t["loss"].mean(), {k: t[k].mean().item() for k in PAIR_METRICS if k != "loss"}

    def tokens(self, rows: list[int]) -> int:
        (c_ids, _), (r_ids, _) = self.splits["train"]
        return sum(len(c_ids[i]) + len(r_ids[i]) for i in rows)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        sums = [0.0] * (len(PAIR_METRICS) + 1)  # n, then each metric's sum
        for rows, valid in eval_shards(self.n("eval"), self.tcfg.micro_batch_size, self.rank, self.world):
            t = self.terms(engine, "eval", rows)
            v = torch.tensor(valid, dtype=torch.float32, device=t["loss"].device)
            sums[0] += v.sum().item()
            for j, k in enumerate(PAIR_METRICS, start=1):
                sums[j] += (t[k] * v).sum().item()
        n, *totals = all_reduce_sum(sums)
        return {k: s / max(n, 1.0) for k, s in zip(PAIR_METRICS, totals)}

    @torch.no_grad()
    def reference_table(self, model, split: str) -> torch.Tensor:
        """`model`'s response log-probs of every pair of `split`, computed once, sharded over the ranks and summed
        (each rank fills its rows, zeros elsewhere). -> [n, 2] (chosen, rejected), float64 on the CPU"""
        n = self.n(split)
        table = torch.zeros(n, 2, dtype=torch.float64)
        for rows, valid in eval_shards(n, self.tcfg.micro_batch_size, self.rank, self.world):
            logp = response_logprobs(model, self.batch(split, rows)).double().cpu()
            half = logp.shape[0] // 2
            for j, (i, ok) in enumerate(zip(rows, valid)):
                if ok:
                    table[i] = torch.stack([logp[j], logp[half + j]])
        return torch.tensor(all_reduce_sum(table.flatten()), dtype=torch.float64).view(n, 2)


def adapter_reference(policy, split, rows, batch) -> torch.Tensor:  # noqa: ARG001 - the batch is all it needs
    """The reference as the policy with its LoRA adapters disabled (peft's `disable_adapter`), in eval mode (no
    dropout): the frozen base is the SFT policy, so no second model is kept."""
    module = trained_module(policy)
    was_training = module.training
    module.eval()
    try:
        with module.disable_adapter():
            return response_logprobs(policy, batch)
    finally:
        module.train(was_training)


def frozen_copy_reference(model, tcfg: DPOConfig) -> Reference:
    """The reference as a frozen copy of `model` (the SFT policy, before LoRA) in a stage-0 engine, or ZeRO-3
    partitioned when the policy's engine is (`build_engine(trainable=False)`)."""
    engine = build_engine(copy.deepcopy(model), tcfg, trainable=False)
    return lambda policy, split, rows, batch: response_logprobs(engine, batch)


def precomputed_reference(model, task: DPOTask) -> Reference:
    """The reference as `model`'s (the SFT policy's) log-probs of every train and eval pair, computed here once;
    training then holds no second model. A resumed job recomputes them from the same SFT weights (the same
    numbers), so checkpoints need not carry them."""
    was_training = model.training
    model.to(task.dev).eval()
    tables = {split: task.reference_table(model, split) for split in task.splits}
    model.train(was_training)

    def lookup(policy, split, rows, batch):  # noqa: ARG001 - the rows are all it needs
        t = tables[split][rows]
        return torch.cat([t[:, 0], t[:, 1]])

    return lookup


def dpo_task(model, tokenizer, train_examples: dict, eval_examples: dict, tcfg: DPOConfig) -> StageTask:
    """The DPO `StageTask`: dropout (`tcfg.dropout`) and LoRA (`tcfg.lora`) applied to `model` (the SFT policy),
    its reference built as `tcfg.reference` says, pairs from token ids {"prompt_ids", "chosen_ids",
    "rejected_ids": [[int]]} (responses ending with EOS)."""
    init_distributed()
    set_dropout(model, tcfg.dropout)
    model.config.use_cache = False
    task = DPOTask(tcfg, tokenizer, train_examples, eval_examples)
    mode = tcfg.reference_mode
    if mode == "copy":
        task.reference = frozen_copy_reference(model, tcfg)
    elif mode == "precomputed":
        task.reference = precomputed_reference(model, task)
    else:
        task.reference = adapter_reference
    model = apply_lora(model, tcfg.lora)
    return StageTask(name="dpo", tcfg=tcfg, model=model, tokenizer=tokenizer, n_train=task.n("train"),
                     loss=task.loss, evaluate=task.evaluate, tokens=task.tokens)


def fit(model, tokenizer, train_examples: dict, eval_examples: dict, config: DPOConfig | None = None, *,
        out_dir: str | Path | None = None) -> TrainResult:
    """DPO from Python, without a pipeline, spec or store.

    `model`: the SFT policy, a causal LM (`models.load_causal_lm(path)`), which is also the reference; `tokenizer`
    with a pad token; examples: {"prompt_ids", "chosen_ids", "rejected_ids": [[int]]} (token ids; responses end
    with EOS). Every `DPOConfig` field applies except checkpoints, which need a store. Returns
    TrainResult(engine, summary, history); with `out_dir`, a plain HF folder + metrics.json land there."""
    config = config or DPOConfig()
    return fit_task(dpo_task(model, tokenizer, train_examples, eval_examples, config), out_dir=out_dir)


def run(spec) -> dict:
    ctx = stage_setup(spec)
    tcfg = ctx.cfg.dpo
    seed_everything(tcfg.seed)
    if "sft" not in spec.inputs:
        raise DataError("dpo stage spec has no sft input (DPO starts from, and is anchored to, the SFT policy)")
    path = resolve_model_path(spec.inputs["sft"], ctx)
    tokenizer = load_tokenizer(path, padding_side="right")
    model = load_causal_lm(path, dtype=torch.float32)
    cols = ("chosen", "rejected")
    train = load_examples(ctx, "reward", "train", tokenizer, cols)
    evals = load_examples(ctx, "reward", "eval", tokenizer, cols)
    try:
        return run_training_stage(spec, dpo_task(model, tokenizer, train, evals, tcfg))
    finally:
        destroy_distributed()
