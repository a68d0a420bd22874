"""Cross-field rules: what no single field's bounds can say, checked before anything is launched.

Each rule is a pure function of config objects (no torch, no I/O) that returns the violations it finds; a violation
is one line naming every field involved. The config models run the rules that need nothing but the config when
they are validated (so `load_config` turns them into one `ConfigError` line, exit 2); the pre-launch checks run the
two that need facts known only then: the device the jobs get (`device_rules`) and the rows of each data phase
(`data_fit_rules`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from pydantic_core import PydanticCustomError

from ..errors import ConfigError
from .methods import STEP3

if TYPE_CHECKING:
    from .pipeline import PipelineConfig, TinyModelConfig
    from .stages import DPOConfig, PPOConfig
    from .training import EngineConfig


@dataclass(frozen=True)
class Violation:
    """One broken rule. `fields` are the dotted paths it names (a `--set` of any of them is the error's origin)."""

    fields: tuple[str, ...]
    message: str


def ppo_rules(ppo: PPOConfig) -> list[Violation]:
    """The experience buffer is a whole number of mini-batches, each a whole number of micro-batches; and the
    combinations the PPO engines refuse (DeepSpeed HE tensor parallelism without ZeRO-3, an EMA of a LoRA actor).

    DeepSpeed steps the optimizer on its own micro-step counter (every mini_batch_size / micro_batch_size
    micro-steps), so a partial mini-batch would spill its gradients into the next update."""
    out = []
    rows = ppo.prompt_batch_size * ppo.samples_per_prompt * ppo.generation_batches
    factors = {"ppo.prompt_batch_size": ppo.prompt_batch_size, "ppo.samples_per_prompt": ppo.samples_per_prompt,
               "ppo.generation_batches": ppo.generation_batches}
    if ppo.samples_per_prompt == 1:  # one answer per prompt (DS-Chat's PPO): the buffer is named as it always was
        del factors["ppo.samples_per_prompt"]
    buffer = f"{' x '.join(factors)} ({' x '.join(str(v) for v in factors.values())})"
    sizes = ("ppo.mini_batch_size", "ppo.prompt_batch_size", "ppo.samples_per_prompt", "ppo.generation_batches")
    if ppo.mini_batch_size > rows:
        out.append(Violation(sizes, f"ppo.mini_batch_size ({ppo.mini_batch_size}) is larger than one experience "
                                    f"buffer, {buffer} = {rows} rows"))
    elif rows % ppo.mini_batch_size:
        out.append(Violation(sizes, f"{buffer} = {rows} rows must be a multiple of ppo.mini_batch_size "
                                    f"({ppo.mini_batch_size})"))
    for name in ("actor", "critic"):
        micro = min(getattr(ppo, name).micro_batch_size, ppo.mini_batch_size)
        if ppo.mini_batch_size % micro:
            out.append(Violation((f"ppo.{name}.micro_batch_size", "ppo.mini_batch_size"),
                                 f"ppo.mini_batch_size ({ppo.mini_batch_size}) must be a whole number of "
                                 f"ppo.{name}.micro_batch_size ({micro}) micro-batches"))
    if ppo.hybrid_engine == "deepspeed" and ppo.inference_tp_size > 1 and ppo.actor.zero_stage != 3:
        out.append(Violation(("ppo.inference_tp_size", "ppo.actor.zero_stage"),
                             f"ppo.inference_tp_size > 1 needs ppo.actor.zero_stage=3, got {ppo.actor.zero_stage} "
                             f"(DeepSpeed Hybrid Engine rule)"))
    if ppo.ema_decay is not None and ppo.actor.lora.r > 0:
        out.append(Violation(("ppo.ema_decay", "ppo.actor.lora.r"),
                             "ppo.ema_decay with LoRA on the actor (ppo.actor.lora.r > 0) is not supported"))
    if ppo.reward != "rm" and ppo.reward_fn is None:
        out.append(Violation(("ppo.reward", "ppo.reward_fn"),
                             f"ppo.reward={ppo.reward} needs ppo.reward_fn (package.module:callable, e.g. "
                             "rlhf_tasks.data.demo:gold_score)"))
    if ppo.reward == "rm" and ppo.reward_fn is not None:
        out.append(Violation(("ppo.reward_fn", "ppo.reward"),
                             f"ppo.reward_fn ({ppo.reward_fn}) is unused with ppo.reward=rm; set ppo.reward=fn or "
                             "rm+fn"))
    if ppo.kl_in == "loss" and ppo.adaptive_kl:
        out.append(Violation(("ppo.adaptive_kl", "ppo.kl_in"),
                             "ppo.adaptive_kl steers the KL penalty in the reward (ppo.kl_coef); with "
                             "ppo.kl_in=loss the KL term's coefficient is the fixed ppo.kl_loss_coef"))
    return out


def dpo_rules(dpo: DPOConfig) -> list[Violation]:
    """The reference DPO is asked to use exists, and no setting is given that the chosen loss ignores."""
    out = []
    lora = dpo.lora
    if dpo.reference == "adapter" and not (lora.r > 0 and lora.only_optimize_lora):
        out.append(Violation(("dpo.reference", "dpo.lora.r", "dpo.lora.only_optimize_lora"),
                             "dpo.reference=adapter needs LoRA with a frozen base (dpo.lora.r > 0 and "
                             "dpo.lora.only_optimize_lora=true): with the adapters disabled the policy is the SFT "
                             "policy only then; use dpo.reference=copy or precomputed"))
    if dpo.loss == "ipo" and dpo.label_smoothing > 0:
        out.append(Violation(("dpo.label_smoothing", "dpo.loss"),
                             f"dpo.label_smoothing ({dpo.label_smoothing}) is unused with dpo.loss=ipo; it smooths "
                             "the sigmoid loss (conservative DPO)"))
    return out


CRITIC_FREE = ("grpo", "rloo")  # step-3 methods without a critic: the baseline is the prompt's other answers
# PPO fields that configure only the critic (or GAE's lambda): ignored by grpo/rloo and left out of their stage key
CRITIC_FIELDS = ("critic", "critic_lr", "cliprange_value", "vf_coef", "critic_from_reward", "critic_warmup_steps",
                 "lam")


def step3_rules(method: str, ppo: PPOConfig) -> list[Violation]:
    """What the step-3 method asks of the ppo section: grpo/rloo compare the answers to one prompt, so they need
    at least two per prompt."""
    if method in CRITIC_FREE and ppo.samples_per_prompt < 2:
        return [Violation(("ppo.samples_per_prompt", "method"),
                          f"method={method} needs ppo.samples_per_prompt >= 2 (its baseline is the other answers "
                          f"to the same prompt), got {ppo.samples_per_prompt}")]
    return []


def needs_reward_model(method: str, ppo: PPOConfig) -> bool:
    """Whether step 3 reads the reward stage's artifact: to score answers (ppo.reward rm or rm+fn), or, for PPO,
    to initialise the critic from it (ppo.critic_from_reward)."""
    return ppo.uses_reward_model or (method not in CRITIC_FREE and ppo.critic_from_reward)


_CALLABLE_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_callable_ref(ref: str | None) -> str | None:
    """A `package.module:callable` reference is well formed (whether it imports is preflight's check)."""
    if ref is not None and not _CALLABLE_REF.fullmatch(ref):
        raise ValueError(f"{ref!r} is not package.module:callable (e.g. rlhf_tasks.data.demo:gold_score)")
    return ref


def tiny_model_rules(tiny: TinyModelConfig) -> list[Violation]:
    """Attention splits the hidden size into equal heads."""
    if tiny.hidden_size % tiny.num_heads:
        return [Violation(("models.tiny.hidden_size", "models.tiny.num_heads"),
                          f"models.tiny.hidden_size ({tiny.hidden_size}) must be a multiple of "
                          f"models.tiny.num_heads ({tiny.num_heads})")]
    return []


def _model_refs(cfg: PipelineConfig) -> list[str]:
    m = cfg.models
    return [r for r in (m.actor, m.reward, m.tokenizer) if r]


def _trained(cfg: PipelineConfig) -> dict[str, EngineConfig]:
    """Every trained model's engine settings by config path."""
    return {"sft": cfg.sft, "reward": cfg.reward, "dpo": cfg.dpo, "ppo.actor": cfg.ppo.actor,
            "ppo.critic": cfg.ppo.critic}


def processes(cfg: PipelineConfig) -> int:
    """World size of a training job."""
    return cfg.execution.num_procs * cfg.execution.num_nodes


TRAINING_PHASES = {"sft": "sft", "reward": "reward", "ppo": "ppo", "dpo": "reward"}  # section -> data phase it trains on


def rows_per_step(cfg: PipelineConfig) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Training rows each config section's stage takes from its data phase (`TRAINING_PHASES`: dpo trains on the
    reward phase's pairs) per step (all processes), with the fields whose product it is. The stages of the
    config's method only: a dpo run does not ask the ppo section to fit, nor a ppo run the dpo section."""
    from .methods import pipeline_stages

    world = processes(cfg)
    procs = ("execution.num_procs", "execution.num_nodes")
    stages = pipeline_stages(cfg)
    out = {}
    for stage in ("sft", "reward", "dpo"):
        t = getattr(cfg, stage)
        if stage in stages:
            out[stage] = (t.micro_batch_size * t.grad_accum * world,
                          (f"{stage}.micro_batch_size", f"{stage}.grad_accum", *procs))
    p = cfg.ppo
    if cfg.method in STEP3:
        out["ppo"] = (p.prompt_batch_size * p.generation_batches * world,
                      ("ppo.prompt_batch_size", "ppo.generation_batches", *procs))
    return out


def max_phase_rows(cfg: PipelineConfig) -> dict[str, int]:
    """Upper bounds on each phase's training rows known from the config alone: when every source feeding a phase
    has `max_rows`, the phase has at most their sum (sft_only sources feed only sft). Phases without a bound, or
    given no share by `data_split` (empty on purpose), are left out."""
    shares = dict(zip(("sft", "reward", "ppo"), (float(x) for x in cfg.data.data_split.split(","))))
    out = {}
    for phase in ("sft", "reward", "ppo"):
        feeding = [s for s in cfg.data.sources if phase == "sft" or not s.sft_only]
        if feeding and shares[phase] > 0 and all(s.max_rows is not None for s in feeding):
            out[phase] = sum(s.max_rows for s in feeding)
    return out


def data_fit_rules(cfg: PipelineConfig, train_rows: Mapping[str, int], known_from: str) -> list[Violation]:
    """One step of each training stage must fit in its phase: `train_rows` maps a phase (sft, reward, ppo) to its
    training rows (exact, or an upper bound; phases left out are not checked). `known_from` says where the counts
    come from, for the message (e.g. "the data", "data.sources max_rows")."""
    out = []
    world = processes(cfg)
    for stage, (need, fields) in rows_per_step(cfg).items():
        phase = TRAINING_PHASES[stage]
        have = train_rows.get(phase)
        if have is not None and need > have:
            procs = f" ({world} processes)" if world > 1 else ""
            out.append(Violation(fields + ("data.data_split",),
                                 f"{' x '.join(fields)} = {need} rows per {stage} step{procs}, but {known_from} "
                                 f"give the {phase} phase at most {have} training rows"))
    return out


def device_rules(cfg: PipelineConfig, device_type: str) -> list[Violation]:
    """What needs an accelerator: fp16 training (DeepSpeed's CPU accelerator has none; bf16 and fp32 run) and
    DeepSpeed's Hybrid Engine (CUDA-only inference kernels). `device_type` is what the stage jobs get: "cpu" or
    "cuda"."""
    if device_type != "cpu":
        return []
    out = [Violation((f"{path}.precision", "execution.device"),
                     f"{path}.precision: fp16 needs a GPU, but the stage jobs run on the CPU; use bf16 or fp32")
           for path, t in _trained(cfg).items() if t.precision == "fp16"]
    if cfg.ppo.hybrid_engine == "deepspeed":
        out.append(Violation(("ppo.hybrid_engine", "execution.device"),
                             "ppo.hybrid_engine: deepspeed needs CUDA, but the stage jobs run on the CPU; use "
                             "ppo.hybrid_engine=portable"))
    return out


def pipeline_rules(cfg: PipelineConfig) -> list[Violation]:
    """The rules across sections that the config alone decides."""
    out = []
    if any(ref == "tiny:llama" for ref in _model_refs(cfg)):
        head_dim, rest = divmod(cfg.models.tiny.hidden_size, cfg.models.tiny.num_heads)
        if not rest and head_dim % 2:
            out.append(Violation(("models.tiny.hidden_size", "models.tiny.num_heads"),
                                 f"models.tiny.hidden_size / models.tiny.num_heads = {head_dim} must be even for "
                                 f"tiny:llama (rotary embeddings rotate pairs of dimensions)"))
    out += step3_rules(cfg.method, cfg.ppo)
    if cfg.execution.device == "cpu":
        out += device_rules(cfg, "cpu")
    out += data_fit_rules(cfg, max_phase_rows(cfg), "data.sources max_rows")
    return out


def reject(violations: list[Violation]) -> None:
    """For the config models' validators: the first violation as a pydantic error (`load_config` prints it as one
    line, its origin `--set` when the user set one of the fields it names)."""
    if violations:
        v = violations[0]
        raise PydanticCustomError("cross_field", "{message}", {"message": v.message, "fields": list(v.fields)})


def raise_first(violations: list[Violation]) -> None:
    """For the pre-launch checks: the first violation as a ConfigError (one line, exit 2)."""
    if violations:
        raise ConfigError(violations[0].message)
