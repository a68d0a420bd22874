"""PPOTrainer: experience generation and PPO updates on an RLHFEngine; CriticFreeTrainer: GRPO and RLOO on the
same loop without a critic.

    trainer = PPOTrainer(engine, config)              # or CriticFreeTrainer(engine, config, estimator="grpo")
    exp = trainer.generate_experience(prompt_batch)   # sample, score, old/ref log-probs, values, rewards, advantages
    stats = trainer.train_rlhf(exp)                   # ppo_epochs x mini-batches of actor (+ critic) updates
or `stats = trainer.step(prompt_batch)` for both plus the EMA, the KL controller and every metric.

A prompt batch is a list of token-id lists, or a dict with `prompt_ids` (required) and optionally `prompt` (raw
prompt strings, for gold scoring and `ppo.reward_fn`), `gold` (gold scorer names), the row fields a reward function
may take (`reward_fn.ROW_FIELDS`) and `chosen_ids` (response tokens used as the ptx target with ptx_coef > 0).
Each prompt is answered `ppo.samples_per_prompt` times (its rows repeated in the generation batch, consecutively:
the groups of GRPO/RLOO).

Answers are scored (`ppo.reward`) by the reward model, by `ppo.reward_fn` (x reward_fn_weight), or by their sum;
the KL to the reference goes (`ppo.kl_in`) into the reward (k1 per token, kl_coef) or into the policy loss (k3 per
token, kl_loss_coef).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config.stages import PPOConfig
from ..errors import ConfigError
from ..models import lm_logits
from ..reward_fn import ROW_FIELDS, load_reward_fn
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

    estimator = "gae"
    whiten_by_default = True  # ppo.whiten_advantages null: GAE advantages are whitened per batch

    def __init__(self, engine, config: PPOConfig | None = None, *, advantage_sign: float = 1.0):
        self.engine = engine
        self.config = cfg = config or engine.config
        if cfg.kl_in == "loss":  # no KL term in the reward: the controller holds 0 (kl/coef reports it)
            self.kl_ctl = pm.FixedKLController(0.0)
        else:
            self.kl_ctl = (pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                           else pm.FixedKLController(cfg.kl_coef))
        self.advantage_sign = advantage_sign
        self.whiten_advantages = (self.whiten_by_default if cfg.whiten_advantages is None
                                  else cfg.whiten_advantages)
        self.global_step = 0
        tok = engine.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        self._gold_cache: dict[str, Any] = {}
        if cfg.uses_reward_model and engine.reward is None:
            raise ConfigError(f"ppo.reward={cfg.reward} scores with the reward model, but the engine has none")
        self.reward_fn = load_reward_fn(cfg.reward_fn, "ppo.reward_fn") if cfg.reward != "rm" else None

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

    def _texts(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The decoded answers (special tokens dropped). responses, mask [B, N] -> B strings"""
        tok = self.engine.tokenizer
        return [tok.decode(responses[i][mask[i].bool()].tolist(), skip_special_tokens=True)
                for i in range(responses.shape[0])]

    def _gold(self, batch: dict, texts: Callable[[], list[str]]) -> list[float] | None:
        names, prompts = batch.get("gold"), batch.get("prompt")
        if not names or not prompts:
            return None
        out = []
        for i, (name, prompt) in enumerate(zip(names, prompts)):
            if not name:
                continue
            if name not in self._gold_cache:
                self._gold_cache[name] = _gold_scorer(name)
            fn = self._gold_cache[name]
            if fn is None:
                continue
            out.append(float(fn(prompt, texts()[i])))
        return out or None

    def _repeat(self, batch: dict) -> dict:
        """Every row of a prompt batch `samples_per_prompt` times, consecutively (a prompt's answers form one
        group); the ptx targets stay once per prompt."""
        n = self.config.samples_per_prompt
        if n == 1:
            return batch
        return {k: [x for x in v for _ in range(n)] for k, v in batch.items() if k != "chosen_ids"}

    def _score(self, batch: dict, seqs: torch.Tensor, mask: torch.Tensor,
               texts: Callable[[], list[str]]) -> tuple[torch.Tensor, dict]:
        """The answers' scores (`ppo.reward`): reward model, reward_fn_weight x reward function, or both summed.
        seqs, mask [B, P+N] -> (scores [B] float32, stats)"""
        cfg, eng = self.config, self.engine
        scores, stats = None, {}
        if cfg.uses_reward_model:
            with inference_forward(eng.reward):
                scores = eng.reward(seqs, mask).float()
        if self.reward_fn is not None:
            prompts = batch.get("prompt")
            if not prompts:
                raise ConfigError("ppo.reward_fn needs the raw prompts: the prompt batch has no `prompt`")
            fields = {k: batch[k] for k in ROW_FIELDS if k in batch}
            fn = torch.tensor([self.reward_fn(p, texts()[i], {k: v[i] for k, v in fields.items()})
                               for i, p in enumerate(prompts)], dtype=torch.float32, device=seqs.device)
            stats["reward/fn_mean"] = fn.mean().item()
            if scores is not None:
                stats["reward/rm_mean"] = scores.mean().item()
            scores = cfg.reward_fn_weight * fn if scores is None else scores + cfg.reward_fn_weight * fn
        return scores, stats

    def _advantages(self, shaped: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    old_values: torch.Tensor, rmask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """PPO: the shaped score at the last token with the k1 KL penalty per token, then GAE over the critic's
        values. -> (rewards, kl, advantages, returns [B, N], stats)"""
        cfg = self.config
        rewards, kl = pm.kl_penalty_rewards(old_logprobs, ref_logprobs, shaped, rmask, self.kl_ctl.value)
        advantages, returns = pm.gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
        stats = {"value/mean": pm.masked_mean(old_values, rmask).item(),
                 "value/explained_variance": pm.explained_variance(old_values, returns, rmask)}
        return rewards, kl, advantages, returns, stats

    def _values(self, seqs: torch.Tensor, mask: torch.Tensor, P: int, rmask: torch.Tensor) -> torch.Tensor:
        """The critic's value of every response token. -> [B, N]"""
        eng = self.engine
        eng.critic.eval()
        with inference_forward(eng.critic):
            old_values = eng.critic(seqs, mask)[:, P - 1:-1].float() * rmask
        eng.critic.train()
        return old_values

    # ---- experience -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_experience(self, prompt_batch) -> Experience:
        """Sample responses and compute everything PPO needs, with every model in eval mode (dropout off)."""
        cfg, eng = self.config, self.engine
        prompts = prompt_batch if isinstance(prompt_batch, dict) else {"prompt_ids": prompt_batch}
        batch = self._repeat(prompts)
        dev = eng.device
        ids, pmask = left_pad([list(p) for p in batch["prompt_ids"]], self.pad_id, dev)
        P = ids.shape[1]
        t0 = time.perf_counter()
        seqs = eng.hybrid.generate(ids, pmask, **self.generation_kwargs())
        t_gen = time.perf_counter() - t0
        responses = seqs[:, P:]
        decoded = responses.numel()  # rows x decode steps, pad after EOS included: what the decoder computed
        if responses.shape[1] == 0:  # nothing generated at all: one EOS per row
            responses = torch.full((seqs.shape[0], 1), self.eos_id, dtype=seqs.dtype, device=dev)
        rmask, has_eos = pm.response_mask_after_eos(responses, self.eos_id)
        responses = torch.where(rmask.bool(), responses, torch.full_like(responses, self.pad_id))
        seqs = torch.cat([ids, responses], dim=1)
        mask = torch.cat([pmask, rmask.long()], dim=1)
        decoded_texts: list[list[str]] = []

        def texts() -> list[str]:  # decoded once, when gold or a reward function first needs them
            if not decoded_texts:
                decoded_texts.append(self._texts(responses, rmask))
            return decoded_texts[0]

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
        old_values = self._values(seqs, mask, P, rmask)
        scores, score_stats = self._score(batch, seqs, mask, texts)
        shaped = pm.shape_scores(scores, has_eos, cfg.missing_eos_penalty, cfg.whiten_rewards, cfg.reward_clip)
        rewards, kl, advantages, returns, adv_stats = self._advantages(shaped, old_logprobs, ref_logprobs,
                                                                       old_values, rmask)
        t_exp = time.perf_counter() - t1

        ptx = None
        if cfg.ptx_coef > 0 and prompts.get("chosen_ids"):
            full = [list(p) + list(c) for p, c in zip(prompts["prompt_ids"], prompts["chosen_ids"]) if c]
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
            "time/generation_s": t_gen,
            "time/gen_compile_s": getattr(eng.hybrid, "last_compile_s", 0.0),
            "time/experience_s": t_exp,
            "count/gen_tokens": n_tokens,
            "count/gen_decoded": decoded,
            **score_stats,
            **adv_stats,
        }
        gold = self._gold(batch, texts)
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
        adv = pm.masked_whiten(exp.advantages, rmask) if self.whiten_advantages else exp.advantages
        adv = adv * self.advantage_sign
        P = exp.prompt_len
        B = len(exp)
        critic = eng.critic  # None for the critic-free estimators: actor updates only
        train_actor = critic is None or self.global_step >= cfg.critic_warmup_steps
        eng.actor.train()
        if critic is not None:
            critic.train()
        acc: dict[str, float] = {}
        n_updates = 0
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.global_step)
        micro_a = eng.actor.train_micro_batch_size_per_gpu()
        micro_c = critic.train_micro_batch_size_per_gpu() if critic is not None else 0
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=g).tolist()
            for start in range(0, B, cfg.mini_batch_size):
                rows = perm[start:start + cfg.mini_batch_size]
                if train_actor:
                    for mb in _chunks(rows, micro_a):
                        out = self._actor_micro(exp, adv, mb, P)
                        for k, v in out.items():
                            acc[k] = acc.get(k, 0.0) + v
                for mb in (_chunks(rows, micro_c) if critic is not None else []):
                    out = self._critic_micro(exp, mb, P)
                    for k, v in out.items():
                        acc[k] = acc.get(k, 0.0) + v
                n_updates += 1
        stats = {k: v / max(1, acc.get("count/" + k.split("/")[0] + "_micro", 1)) for k, v in acc.items()
                 if not k.startswith("count/")}
        stats["time/train_s"] = time.perf_counter() - t0
        stats["ppo/updates"] = n_updates
        stats["lr/actor"] = eng.actor.get_lr()[0] if eng.actor.lr_scheduler is not None else cfg.actor_lr
        if critic is not None:
            stats["lr/critic"] = critic.get_lr()[0] if critic.lr_scheduler is not None else cfg.critic_lr
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
        if cfg.kl_in == "loss":  # GRPO's KL term: k3 to the reference per token, averaged like the policy loss
            kl_loss = pm.masked_mean(pm.kl_k3(logp, exp.ref_logprobs[idx], m), m)
            loss = loss + cfg.kl_loss_coef * kl_loss
            stats["policy/kl_loss"] = kl_loss.item()
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
        # answer tokens above count only what each row kept (up to its EOS); the decoder runs every row until the
        # last one ends, so this rate (rows x steps per second) is the one comparable with `generate` benchmarks
        stats["gen/decode_tokens_per_s"] = stats.pop("count/gen_decoded") / max(gen_s, 1e-9)
        stats["samples_per_s"] = len(exp) / stats["time/step_s"]
        return reduce_stats(stats)


class CriticFreeTrainer(PPOTrainer):
    """GRPO or RLOO on an RLHFEngine built without a critic (`RLHFEngine(..., with_critic=False)`): the same
    sampling through the hybrid engine, clipped policy objective, ptx, EMA, KL controller, metrics and checkpoint
    state as PPO, with the critic's baseline replaced by the other answers to the same prompt
    (`ppo.samples_per_prompt` >= 2 of them in each batch):
        grpo  A_i = (r_i - mean_group) / (std_group + eps)   (`ppo.group_std: false`: r_i - mean_group)
        rloo  A_i = r_i - mean_{j != i} r_j
    r is the shaped score (reward model and/or `ppo.reward_fn`, EOS penalty, whitening, clip). A_i sits at the last
    token of answer i; with `ppo.kl_in: reward` each token also gets -kl_coef x k1 KL, and the token advantages
    are the returns-to-go (discount `ppo.gamma`); with `ppo.kl_in: loss` every token of answer i has A_i and the
    policy loss gets kl_loss_coef x the k3 KL. Advantages are not whitened again unless
    `ppo.whiten_advantages: true`."""

    whiten_by_default = False
    ESTIMATORS = ("grpo", "rloo")

    def __init__(self, engine, config: PPOConfig | None = None, *, estimator: str = "grpo",
                 advantage_sign: float = 1.0):
        if estimator not in self.ESTIMATORS:
            raise ConfigError(f"CriticFreeTrainer: estimator {estimator!r} (one of {', '.join(self.ESTIMATORS)})")
        cfg = config or engine.config
        if cfg.samples_per_prompt < 2:
            raise ConfigError(f"{estimator} needs ppo.samples_per_prompt >= 2 (its baseline is the other answers "
                              f"to the same prompt), got {cfg.samples_per_prompt}")
        if engine.critic is not None:
            raise ConfigError(f"{estimator}: build the engine without a critic (RLHFEngine(..., with_critic=False))")
        self.estimator = estimator
        super().__init__(engine, cfg, advantage_sign=advantage_sign)

    def _values(self, seqs, mask, P, rmask):  # noqa: ARG002 - no critic: value 0 (the Experience keeps the field)
        return torch.zeros_like(rmask)

    def _advantages(self, shaped, old_logprobs, ref_logprobs, old_values, rmask):
        """The group baseline on the shaped scores, spread over the tokens by `gae` with values 0 and lambda 1
        (returns-to-go of the per-token KL penalty plus the sequence advantage at the last token).
        -> (rewards: what PPO's would be, kl, advantages, returns (= advantages), stats)"""
        cfg, n = self.config, self.config.samples_per_prompt
        if self.estimator == "grpo":
            seq_adv = pm.group_advantages(shaped, n, scale_by_std=cfg.group_std)
        else:
            seq_adv = pm.leave_one_out_advantages(shaped, n)
        rewards, kl = pm.kl_penalty_rewards(old_logprobs, ref_logprobs, shaped, rmask, self.kl_ctl.value)
        adv_rewards, _ = pm.kl_penalty_rewards(old_logprobs, ref_logprobs, seq_adv, rmask, self.kl_ctl.value)
        advantages, _ = pm.gae(adv_rewards, old_values, rmask, cfg.gamma, 1.0)
        group_std = shaped.float().reshape(-1, n).std(1)
        stats = {"reward/group_std": group_std.mean().item(),  # within-prompt spread: the learning signal
                 "reward/flat_groups": (group_std <= 1e-6).float().mean().item(),  # share with no signal at all
                 "advantage/abs_mean": pm.masked_mean(advantages.abs(), rmask).item()}
        if cfg.kl_in == "loss":
            stats["kl/loss_coef"] = cfg.kl_loss_coef
        return rewards, kl, advantages, advantages, stats


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
