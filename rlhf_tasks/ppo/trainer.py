"""PPOTrainer: experience generation and PPO updates on an RLHFEngine.

    trainer = PPOTrainer(engine, config)
    exp = trainer.generate_experience(prompt_batch)   # sample, score, old/ref log-probs, values, rewards, GAE
    stats = trainer.train_rlhf(exp)                   # ppo_epochs x mini-batches of actor + critic updates
or `stats = trainer.step(prompt_batch)` for both plus the EMA, the KL controller and every metric.

A prompt batch is a list of token-id lists, or a dict with `prompt_ids` (required) and optionally `prompt` (raw
prompt strings, for gold scoring), `gold` (gold scorer names) and `chosen_ids` (response tokens used as the ptx
target with ptx_coef > 0).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config.stages import PPOConfig
from ..models import lm_logits
from ..training.batches import pad_batch
from ..training.distributed import all_reduce_sum, rank_world
from . import ppo_math as pm
from .hybrid import inference_forward, left_pad


@dataclass
class Experience:
    """One experience buffer. B rows, prompt width P (left padded), response width N (right padded).
    sequences/attention_mask [B, P+N]; responses, response_mask, old_logprobs, ref_logprobs, old_values, rewards,
    advantages, returns, kl [B, N]; scores (raw RM), shaped_scores, has_eos [B]."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    responses: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor
    shaped_scores: torch.Tensor
    has_eos: torch.Tensor
    ptx: dict | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]


_PER_TOKEN = ("responses", "response_mask", "old_logprobs", "ref_logprobs", "old_values", "rewards", "advantages",
              "returns", "kl")


def concat_experience(exps: list[Experience], pad_id: int) -> Experience:
    """Concatenate buffers of different prompt/response widths (prompts re-left-padded, responses re-right-padded)."""
    if len(exps) == 1:
        return exps[0]
    P = max(e.prompt_len for e in exps)
    N = max(e.responses.shape[1] for e in exps)

    def pad(x, left, right, value):
        return torch.nn.functional.pad(x, (left, right), value=value)

    out: dict[str, Any] = {"prompt_len": P}
    seqs, masks = [], []
    for e in exps:
        n = e.responses.shape[1]
        seqs.append(pad(e.sequences, P - e.prompt_len, N - n, pad_id))
        masks.append(pad(e.attention_mask, P - e.prompt_len, N - n, 0))
    out["sequences"], out["attention_mask"] = torch.cat(seqs), torch.cat(masks)
    for name in _PER_TOKEN:
        out[name] = torch.cat([pad(getattr(e, name), 0, N - e.responses.shape[1],
                                   pad_id if name == "responses" else 0) for e in exps])
    for name in ("scores", "shaped_scores", "has_eos"):
        out[name] = torch.cat([getattr(e, name) for e in exps])
    ptx = [e.ptx for e in exps if e.ptx is not None]
    if ptx:
        L = max(p["input_ids"].shape[1] for p in ptx)
        out["ptx"] = {k: torch.cat([pad(p[k], 0, L - p[k].shape[1], pad_id if k == "input_ids" else 0) for p in ptx])
                      for k in ("input_ids", "attention_mask")}
    stats: dict[str, float] = {}
    for e in exps:  # sums of timings/counters, means of the rest
        for k, v in e.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    out["stats"] = {k: (v if k.startswith(("time/", "count/")) else v / len(exps)) for k, v in stats.items()}
    return Experience(**out)


def _gold_scorer(name: str) -> Callable[[str, str], float] | None:
    try:
        from ..data.gold import get_gold_scorer
    except ImportError:  # the data package's gold registry not there: the demo scorer only
        if name == "demo":
            from ..data.demo import gold_score

            return gold_score
        return None
    return get_gold_scorer(name)


class PPOTrainer:
    """PPO on an RLHFEngine. Every coefficient comes from `config` (PPOConfig). `advantage_sign=-1` flips the
    advantages (a deliberately broken PPO, used only by tests to show the improvement test can fail)."""

    def __init__(self, engine, config: PPOConfig | None = None, *, advantage_sign: float = 1.0):
        self.engine = engine
        self.config = cfg = config or engine.config
        self.kl_ctl = (pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else pm.FixedKLController(cfg.kl_coef))
        self.advantage_sign = advantage_sign
        self.global_step = 0
        tok = engine.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self._gold_cache: dict[str, Any] = {}

    # ---- state for checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.global_step = int(state["global_step"])

    # ---- helpers ---------------------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict:
        cfg = self.config
        return dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens or None,
                    pad_token_id=self.pad_id, eos_token_id=self.eos_id, use_cache=True)

    def _response_logits(self, model, seq, mask, P):
        """Logits predicting the response tokens: positions P-1 .. end-1. -> [B, N, V]"""
        return lm_logits(model, seq, mask)[:, P - 1:-1]

    def _gold(self, batch: dict, responses: torch.Tensor, mask: torch.Tensor) -> list[float] | None:
        names, prompts = batch.get("gold"), batch.get("prompt")
        if not names or not prompts:
            return None
        tok = self.engine.tokenizer
        out = []
        for i, (name, prompt) in enumerate(zip(names, prompts)):
            if not name:
                continue
            if name not in self._gold_cache:
                self._gold_cache[name] = _gold_scorer(name)
            fn = self._gold_cache[name]
            if fn is None:
                continue
            ids = responses[i][mask[i].bool()].tolist()
            out.append(float(fn(prompt, tok.decode(ids, skip_special_tokens=True))))
        return out or None

    # ---- experience -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_experience(self, prompt_batch) -> Experience:
        """Sample responses and compute everything PPO needs, with every model in eval mode (dropout off)."""
        cfg, eng = self.config, self.engine
        batch = prompt_batch if isinstance(prompt_batch, dict) else {"prompt_ids": prompt_batch}
        dev = eng.device
        ids, pmask = left_pad([list(p) for p in batch["prompt_ids"]], self.pad_id, dev)
        P = ids.shape[1]
        t0 = time.perf_counter()
        seqs = eng.hybrid.generate(ids, pmask, **self.generation_kwargs())
        t_gen = time.perf_counter() - t0
        responses = seqs[:, P:]
        if responses.shape[1] == 0:  # nothing generated at all: one EOS per row
            responses = torch.full((seqs.shape[0], 1), self.eos_id, dtype=seqs.dtype, device=dev)
        rmask, has_eos = pm.response_mask_after_eos(responses, self.eos_id)
        responses = torch.where(rmask.bool(), responses, torch.full_like(responses, self.pad_id))
        seqs = torch.cat([ids, responses], dim=1)
        mask = torch.cat([pmask, rmask.long()], dim=1)

        t1 = time.perf_counter()
        # each forward under inference_forward: ZeRO-3 weights gathered once per model instead of per layer
        eng.actor.eval()
        with inference_forward(eng.actor):
            logits = self._response_logits(eng.actor, seqs, mask, P)
        old_logprobs = pm.logprobs_from_logits(logits, responses, cfg.temperature) * rmask
        entropy = pm.masked_mean(pm.entropy_from_logits(logits, cfg.temperature), rmask).item()
        del logits
        eng.actor.train()
        with inference_forward(eng.ref):
            ref_logits = self._response_logits(eng.ref, seqs, mask, P)
        ref_logprobs = pm.logprobs_from_logits(ref_logits, responses, cfg.temperature) * rmask
        del ref_logits
        eng.critic.eval()
        with inference_forward(eng.critic):
            old_values = eng.critic(seqs, mask)[:, P - 1:-1].float() * rmask
        eng.critic.train()
        with inference_forward(eng.reward):
            scores = eng.reward(seqs, mask).float()
        shaped = pm.shape_scores(scores, has_eos, cfg.missing_eos_penalty, cfg.whiten_rewards, cfg.reward_clip)
        rewards, kl = pm.kl_penalty_rewards(old_logprobs, ref_logprobs, shaped, rmask, self.kl_ctl.value)
        advantages, returns = pm.gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
        t_exp = time.perf_counter() - t1

        ptx = None
        if cfg.ptx_coef > 0 and batch.get("chosen_ids"):
            full = [list(p) + list(c) for p, c in zip(batch["prompt_ids"], batch["chosen_ids"]) if c]
            if full:
                pb = pad_batch(full, self.pad_id, dev=dev)
                ptx = {"input_ids": pb["input_ids"], "attention_mask": pb["attention_mask"]}

        n_tokens = rmask.sum().item()
        lengths = rmask.sum(1)
        stats = {
            "reward/score_mean": scores.mean().item(),
            "reward/score_std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward/shaped_mean": shaped.mean().item(),
            "reward/total_mean": rewards.sum(1).mean().item(),
            "kl/ref": kl.sum(1).mean().item(),
            "kl/coef": self.kl_ctl.value,
            "entropy": entropy,
            "response/length": lengths.float().mean().item(),
            "response/eos_rate": has_eos.float().mean().item(),
            "value/mean": pm.masked_mean(old_values, rmask).item(),
            "value/explained_variance": pm.explained_variance(old_values, returns, rmask),
            "time/generation_s": t_gen,
            "time/gen_compile_s": getattr(eng.hybrid, "last_compile_s", 0.0),
            "time/experience_s": t_exp,
            "count/gen_tokens": n_tokens,
        }
        gold = self._gold(batch, responses, rmask)
        if gold:
            stats["gold/mean"] = sum(gold) / len(gold)
        return Experience(seqs, mask, P, responses, rmask, old_logprobs, ref_logprobs, old_values, rewards,
                          advantages, returns, kl, scores, shaped, has_eos, ptx, stats)

    # ---- training -------------------------------------------------------------------------------------------
    def train_rlhf(self, exp: Experience) -> dict:
        """ppo_epochs passes over the buffer (reshuffled each pass) in mini-batches of `mini_batch_size` rows:
        clipped policy loss (+ ptx) on the actor, clipped value loss on the critic."""
        cfg, eng = self.config, self.engine
        t0 = time.perf_counter()
        rmask = exp.response_mask
        adv = pm.masked_whiten(exp.advantages, rmask) if cfg.whiten_advantages else exp.advantages
        adv = adv * self.advantage_sign
        P = exp.prompt_len
        B = len(exp)
        train_actor = self.global_step >= cfg.critic_warmup_steps
        eng.actor.train()
        eng.critic.train()
        acc: dict[str, float] = {}
        n_updates = 0
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.global_step)
        micro_a = eng.actor.train_micro_batch_size_per_gpu()
        micro_c = eng.critic.train_micro_batch_size_per_gpu()
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=g).tolist()
            for start in range(0, B, cfg.mini_batch_size):
                rows = perm[start:start + cfg.mini_batch_size]
                if train_actor:
                    for mb in _chunks(rows, micro_a):
                        out = self._actor_micro(exp, adv, mb, P)
                        for k, v in out.items():
                            acc[k] = acc.get(k, 0.0) + v
                for mb in _chunks(rows, micro_c):
                    out = self._critic_micro(exp, mb, P)
                    for k, v in out.items():
                        acc[k] = acc.get(k, 0.0) + v
                n_updates += 1
        stats = {k: v / max(1, acc.get("count/" + k.split("/")[0] + "_micro", 1)) for k, v in acc.items()
                 if not k.startswith("count/")}
        stats["time/train_s"] = time.perf_counter() - t0
        stats["ppo/updates"] = n_updates
        stats["lr/actor"] = eng.actor.get_lr()[0] if eng.actor.lr_scheduler is not None else cfg.actor_lr
        stats["lr/critic"] = eng.critic.get_lr()[0] if eng.critic.lr_scheduler is not None else cfg.critic_lr
        return stats

    def _actor_micro(self, exp: Experience, adv: torch.Tensor, rows: list[int], P: int) -> dict:
        cfg, eng = self.config, self.engine
        idx = torch.tensor(rows, device=exp.sequences.device)
        seq, mask, m = exp.sequences[idx], exp.attention_mask[idx], exp.response_mask[idx]
        logits = self._response_logits(eng.actor, seq, mask, P)
        logp = pm.logprobs_from_logits(logits, exp.responses[idx], cfg.temperature)
        out = pm.policy_loss(logp, exp.old_logprobs[idx], adv[idx], m, cfg.cliprange)
        loss = out.loss
        stats = {"policy/loss": out.loss.item(), "policy/clipfrac": out.clipfrac.item(),
                 "policy/approx_kl": out.approx_kl.item(), "policy/ratio": out.ratio_mean.item(),
                 "count/policy_micro": 1.0}
        if cfg.ptx_coef > 0 and exp.ptx is not None:
            n = exp.ptx["input_ids"].shape[0]
            pidx = torch.tensor([r % n for r in rows], device=idx.device)
            pids, pmask = exp.ptx["input_ids"][pidx], exp.ptx["attention_mask"][pidx]
            ptx_loss = pm.lm_loss(lm_logits(eng.actor, pids, pmask), pids, pmask)
            loss = loss + cfg.ptx_coef * ptx_loss
            stats["ptx/loss"] = ptx_loss.item()
            stats["count/ptx_micro"] = 1.0
        eng.actor.backward(loss)
        eng.actor.step()
        return stats

    def _critic_micro(self, exp: Experience, rows: list[int], P: int) -> dict:
        cfg, eng = self.config, self.engine
        idx = torch.tensor(rows, device=exp.sequences.device)
        values = eng.critic(exp.sequences[idx], exp.attention_mask[idx])[:, P - 1:-1].float()
        loss, clipfrac = pm.value_loss(values, exp.old_values[idx], exp.returns[idx], exp.response_mask[idx],
                                       cfg.cliprange_value, cfg.vf_coef)
        eng.critic.backward(loss)
        eng.critic.step()
        return {"value/loss": loss.item(), "value/clipfrac": clipfrac.item(), "count/value_micro": 1.0}

    # ---- one full step ----------------------------------------------------------------------------------------
    def step(self, prompt_batches) -> dict:
        """One PPO step: `generation_batches` experience batches (a list of prompt batches, or one batch), PPO
        updates, EMA update, KL controller update. Returns every metric (averaged over processes)."""
        t0 = time.perf_counter()
        if isinstance(prompt_batches, dict) or not (isinstance(prompt_batches[0], dict)
                                                    or _is_batch_list(prompt_batches)):
            prompt_batches = [prompt_batches]
        exp = concat_experience([self.generate_experience(b) for b in prompt_batches], self.pad_id)
        train_stats = self.train_rlhf(exp)
        if self.engine.ema is not None:
            self.engine.ema.update()
        self.kl_ctl.update(exp.stats["kl/ref"], len(exp) * self.engine.world_size)
        self.global_step += 1
        stats = {**exp.stats, **train_stats}
        stats["time/step_s"] = time.perf_counter() - t0
        # compile/warm-up time (first steps of a stage only) is reported apart, not counted against throughput
        gen_s = stats["time/generation_s"] - stats["time/gen_compile_s"]
        stats["gen/tokens_per_s"] = stats.pop("count/gen_tokens") / max(gen_s, 1e-9)
        stats["samples_per_s"] = len(exp) / stats["time/step_s"]
        return reduce_stats(stats)


def _is_batch_list(x) -> bool:
    """A list of prompt batches (each a list of token lists) rather than one batch of token lists."""
    return bool(x) and isinstance(x[0], (list, tuple)) and bool(x[0]) and isinstance(x[0][0], (list, tuple))


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def reduce_stats(stats: dict) -> dict:
    """Mean of every metric over processes, over the union of the ranks' keys (agreed first, so every rank
    all-reduces the same vector): a rank without a value for a key (e.g. no gold-scored row in its batch) or with a
    non-finite one does not count in that key's mean; a key no rank has a finite value for is NaN."""
    rank, world = rank_world()
    if world == 1:
        return {k: float(stats[k]) for k in sorted(stats)}
    key_sets: list = [None] * world
    torch.distributed.all_gather_object(key_sets, sorted(stats))
    keys = sorted(set().union(*key_sets))
    values = [float(stats.get(k, math.nan)) for k in keys]
    finite = [math.isfinite(v) for v in values]
    sums = all_reduce_sum([v if ok else 0.0 for v, ok in zip(values, finite)] + [float(ok) for ok in finite])
    totals, counts = sums[:len(keys)], sums[len(keys):]
    return {k: total / count if count else math.nan for k, total, count in zip(keys, totals, counts)}
