"""RLHFEngine: the four models of PPO (and an optional EMA of the actor) as DeepSpeed engines.

- actor: causal LM, trainable, ZeRO 0-3 (`ppo.actor`), optional LoRA; generation through the hybrid engine.
- ref: frozen copy of the starting actor, no optimizer; ZeRO-3 partitioned when the actor is (`ppo.actor`).
- critic: per-token values (a score model, initialised from the reward model by default), trainable (`ppo.critic`).
- reward: frozen score model, no optimizer; ZeRO-3 when the critic is.
- ema: optional exponential moving average of the actor's weights (`ppo.ema_decay`, DS-Chat 0.992), kept on rank 0.
Critic-free RL (grpo, rloo) builds no critic (`with_critic=False`: no engine, no optimizer, no memory for it), and
a programmatic reward alone (`ppo.reward: fn`) no reward model (`reward=None`).
Dropout is off in all of them (ref/reward always; actor/critic unless `ppo.<model>.dropout` says otherwise).
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any

import torch

from ..config.stages import PPOConfig, PPOModelConfig
from ..config.training import OptimConfig, TrainingConfig
from ..errors import ConfigError
from ..models import load_causal_lm, load_score_model, load_tokenizer, set_dropout
from ..training.distributed import barrier, device, init_distributed, seed_everything
from ..training.engine import ScoreHead, apply_lora, build_engine, is_peft, plain_hf_model
from ..training.export import full_state_dict, save_hf
from .hybrid import deepspeed_he_config, make_hybrid_engine


def updates_per_batch(cfg: PPOConfig) -> int:
    """Optimizer steps of the actor (and critic) per experience step: mini-batches of the experience buffer, whose
    rows are every answer (samples_per_prompt per prompt), times the epochs. The LR schedule is sized by it: an
    undercount ends a cosine schedule early and, past its end, transformers' cosine climbs back to the peak LR."""
    rows = cfg.prompt_batch_size * cfg.samples_per_prompt * cfg.generation_batches
    return cfg.ppo_epochs * math.ceil(rows / cfg.mini_batch_size)


def engine_config(model: PPOModelConfig, mini_batch_size: int, lr: float) -> TrainingConfig:
    """The DeepSpeed engine settings of one PPO model (what `build_engine` takes), batch bookkeeping matched to
    one PPO mini-batch: micro-batches of `micro_batch_size` rows (at most the mini-batch; the config check makes the
    mini-batch a whole number of them), accumulated into one optimizer step per mini-batch."""
    micro = min(model.micro_batch_size, mini_batch_size)
    return TrainingConfig(zero_stage=model.zero_stage, precision=model.precision, offload=model.offload,
                          micro_batch_size=micro, grad_accum=mini_batch_size // micro,
                          gradient_checkpointing=model.gradient_checkpointing, lora=model.lora,
                          optim=OptimConfig(lr=lr, **model.optim.model_dump()))


class Offloaded:
    """A frozen engine whose module lives on the CPU between uses (non-ZeRO-3 offload of ref/reward); calling it
    moves the module to the device for the forward and back after. On a CPU device this is a plain call."""

    def __init__(self, engine, dev: torch.device):
        self.engine, self.dev = engine, dev
        self.module = engine.module
        if dev.type != "cpu":
            self.module.to("cpu")

    def __call__(self, *args, **kwargs):
        if self.dev.type == "cpu":
            return self.engine(*args, **kwargs)
        self.module.to(self.dev)
        try:
            return self.engine(*args, **kwargs)
        finally:
            self.module.to("cpu")

    def __getattr__(self, name):
        return getattr(self.engine, name)


class ActorEMA:
    """EMA of the actor's parameters: ema <- decay * ema + (1 - decay) * param after every experience step.
    Kept in fp32 on rank 0 on the actor's device (ZeRO-3 parameters are gathered for the update: every rank must
    call `update`). It speaks the engine checkpoint protocol (`save_checkpoint` / `load_checkpoint`), so
    `CheckpointManager` saves and restores it with the other engines."""

    def __init__(self, actor_engine, decay: float, rank: int):
        if is_peft(actor_engine.module):
            raise ConfigError("ppo.ema_decay with LoRA on the actor is not supported (EMA of merged weights)")
        self.actor, self.decay, self.rank = actor_engine, decay, rank
        self.shadow: dict[str, torch.Tensor] = {}
        with self._gathered():
            if rank == 0:
                self.shadow = {n: p.detach().float().clone() for n, p in actor_engine.module.named_parameters()}

    def _gathered(self):
        if self.actor.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.actor.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    @torch.no_grad()
    def update(self) -> None:
        with self._gathered():
            if self.rank == 0:
                for n, p in self.actor.module.named_parameters():
                    self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict_for_save(self) -> dict[str, torch.Tensor] | None:
        """Full model state dict with the EMA weights (rank 0; None elsewhere). Every rank must call this."""
        sd = full_state_dict(self.actor, self.rank)
        if sd is None:
            return None
        for n, t in self.shadow.items():
            if n in sd:
                sd[n] = t.to("cpu", sd[n].dtype)
        return sd

    def save_hf(self, tokenizer, out_dir: str | Path) -> None:
        sd = self.state_dict_for_save()
        if self.rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            plain_hf_model(self.actor.module).save_pretrained(out_dir, state_dict=sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
        barrier()

    # engine checkpoint protocol (CheckpointManager)
    def save_checkpoint(self, save_dir: str, tag: str, client_state=None, save_latest=False) -> None:  # noqa: ARG002
        if self.rank == 0:
            from safetensors.torch import save_file

            folder = Path(save_dir) / tag
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}, str(folder / "ema.safetensors"))

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str | None, dict]:
        path = Path(load_dir) / tag / "ema.safetensors"
        if self.rank == 0:
            if not path.exists():
                return None, {}
            from safetensors.torch import load_file

            dev = next(iter(self.shadow.values())).device if self.shadow else "cpu"
            self.shadow = {n: t.to(dev) for n, t in load_file(str(path)).items()}
        return str(path), {}


def _as_module(obj, loader, **kw):
    return loader(str(obj), **kw) if isinstance(obj, (str, Path)) else obj


class RLHFEngine:
    """Actor, reference, critic, reward (and EMA) ready for PPO.

    Models may be given as modules or as paths (HF folders / artifacts); `critic=None` initialises the critic from
    the reward model (`config.critic_from_reward`, else from the actor with a new value head), `ref=None` copies
    the starting actor. `with_critic=False` builds no critic at all (`self.critic` is None: GRPO, RLOO);
    `reward=None` no reward model (`self.reward` is None: answers scored by a function alone). `total_steps` is
    the number of experience steps (for the LR schedules)."""

    def __init__(self, actor, reward, critic=None, ref=None, tokenizer=None, config: PPOConfig | None = None, *,
                 total_steps: int | None = None, world_size: int | None = None, with_critic: bool = True):
        self.config = cfg = config or PPOConfig()
        self.rank, world = init_distributed()
        self.world_size = world_size or world
        self.device = device()
        actor_path = str(actor) if isinstance(actor, (str, Path)) else None
        reward_path = str(reward) if isinstance(reward, (str, Path)) else None
        if tokenizer is None:
            if actor_path is None:
                raise ConfigError("RLHFEngine: pass a tokenizer when the actor is a module")
            tokenizer = load_tokenizer(actor_path, padding_side="left")
        self.tokenizer = tokenizer

        seed_everything(cfg.seed)
        actor_m = _as_module(actor, load_causal_lm)
        reward_m = _as_module(reward, load_score_model) if reward is not None else None
        if not with_critic:
            critic = None
        elif critic is None:
            if cfg.critic_from_reward:
                if reward_m is None:
                    raise ConfigError("RLHFEngine: ppo.critic_from_reward needs a reward model (pass reward, or "
                                      "set critic_from_reward=false)")
                critic = reward_path if reward_path else copy.deepcopy(reward_m)
            elif actor_path:
                critic = actor_path
            else:
                raise ConfigError("RLHFEngine: critic_from_reward=false needs the actor as a path (or pass critic)")
        critic_m = _as_module(critic, load_score_model) if with_critic else None
        ref_m = copy.deepcopy(actor_m) if ref is None else _as_module(ref, load_causal_lm)

        set_dropout(ref_m, 0.0)
        if reward_m is not None:
            set_dropout(reward_m, 0.0)
        set_dropout(actor_m, cfg.actor.dropout if cfg.actor.dropout is not None else 0.0)
        if critic_m is not None:
            set_dropout(critic_m, cfg.critic.dropout if cfg.critic.dropout is not None else 0.0)

        self.steps_total = total_steps or cfg.total_steps or 1000
        opt_steps = self.steps_total * updates_per_batch(cfg)
        actor_t = engine_config(cfg.actor, cfg.mini_batch_size, cfg.actor_lr)
        critic_t = engine_config(cfg.critic, cfg.mini_batch_size, cfg.critic_lr)

        actor_m = apply_lora(actor_m, cfg.actor.lora)
        he_extra = None
        if cfg.hybrid_engine == "deepspeed":
            from .hybrid import check_deepspeed_he_supported

            check_deepspeed_he_supported(cfg.actor.zero_stage, cfg.inference_tp_size)
            he_extra = deepspeed_he_config(cfg.max_new_tokens + 512, cfg.inference_tp_size,
                                           cfg.tp_gather_partition_size, cfg.release_inference_cache,
                                           cfg.pin_parameters)
        self.actor = build_engine(actor_m, actor_t, total_steps=opt_steps, world_size=self.world_size,
                                  extra_config=he_extra)
        self.critic = None
        if critic_m is not None:
            critic_m = apply_lora(critic_m, cfg.critic.lora)
            self.critic = build_engine(ScoreHead(critic_m, "tokens"), critic_t, total_steps=opt_steps,
                                       world_size=self.world_size)
        ref_t = actor_t.model_copy(update={"offload": cfg.offload_reference or actor_t.offload})
        # the frozen reward model shares the critic's ZeRO settings (ZeRO-3 when the critic is); without a critic
        # the actor's (ZeRO-3 when the actor is)
        reward_t = (critic_t if with_critic else actor_t).model_copy(
            update={"offload": cfg.offload_reward or (critic_t if with_critic else actor_t).offload})
        self.ref = build_engine(ref_m, ref_t, world_size=self.world_size, trainable=False)
        self.reward = None
        if reward_m is not None:
            self.reward = build_engine(ScoreHead(reward_m, "sequence"), reward_t, world_size=self.world_size,
                                       trainable=False)
        if cfg.offload_reference and ref_t.zero_stage != 3:
            self.ref = Offloaded(self.ref, self.device)
        if self.reward is not None and cfg.offload_reward and reward_t.zero_stage != 3:
            self.reward = Offloaded(self.reward, self.device)
        self.ema = ActorEMA(self.actor, cfg.ema_decay, self.rank) if cfg.ema_decay else None
        self.hybrid = make_hybrid_engine(cfg.hybrid_engine, self.actor, cfg.generation)

    @classmethod
    def from_paths(cls, actor_path: str, reward_path: str, config: PPOConfig | None = None, **kw) -> "RLHFEngine":
        """Actor from an SFT artifact / HF causal-LM folder, reward (and critic) from a reward artifact / HF folder."""
        return cls(actor=actor_path, reward=reward_path, config=config, **kw)

    @classmethod
    def from_artifacts(cls, store, sft_uri: str, reward_uri: str, config: PPOConfig | None = None, **kw):
        """Same, from store URIs (downloaded and verified by the store)."""
        return cls.from_paths(str(store.get_uri(sft_uri)), str(store.get_uri(reward_uri)), config, **kw)

    def trainable_engines(self) -> dict[str, Any]:
        """What a checkpoint must hold: actor and critic (module, optimizer, scheduler; no critic: the actor alone)
        and the EMA."""
        out = {"actor": self.actor}
        if self.critic is not None:
            out["critic"] = self.critic
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def save_actor(self, out_dir: str | Path) -> None:
        """Consolidated HF folders: `out_dir` (actor) and, with an EMA, `out_dir/../ema`. All ranks call this."""
        cfg = self.config
        save_hf(self.actor, self.tokenizer, out_dir, self.rank,
                keep_adapter=cfg.actor.lora.r > 0 and not cfg.actor.lora.merge)
