"""DeepSpeed engines: the generated DeepSpeed config, `build_engine`, LoRA (peft), gradient checkpointing and
`ScoreHead` (a score model whose engine forward returns scores)."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .private_internals import scope_zero3_linear, skip_single_process_allreduce
from .distributed import device, rank_world


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class ScoreHead(torch.nn.Module):
    """Wraps a score model (AutoModelForSequenceClassification, possibly inside a peft wrapper) so that a DeepSpeed
    engine's forward returns scores: per-token values [B, T] (`mode="tokens"`, the PPO critic) or the score at the
    last real token [B] (`mode="sequence"`, the reward model). Padding is read from the attention mask only.
    Scores must go through the engine's forward: ZeRO-3 and gradient checkpointing hook in there."""

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from ..models import sequence_scores, token_values

        fn = token_values if self.mode == "tokens" else sequence_scores
        return fn(plain_hf_model(self.model), input_ids, attention_mask)


def trained_module(model) -> torch.nn.Module:
    """What an engine trains, as saved: the module inside a DeepSpeed engine and/or a `ScoreHead` (a peft wrapper
    stays, so its adapters can be merged or saved)."""
    model = getattr(model, "module", model) if hasattr(model, "zero_optimization_stage") else model
    return model.model if isinstance(model, ScoreHead) else model


def plain_hf_model(model) -> torch.nn.Module:
    """The plain HF model inside a DeepSpeed engine, a `ScoreHead` and/or a peft wrapper (LoRA layers stay
    injected)."""
    model = trained_module(model)
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model, lora_cfg):
    """Wrap `model` with LoRA adapters (peft) when `lora_cfg.r > 0`; otherwise return it unchanged.

    Targets are module-name suffixes present in the model (unknown ones are ignored; none present is an error).
    `only_optimize_lora` freezes the base weights (a score head, if any, stays trainable); otherwise every
    weight trains alongside the adapters."""
    if lora_cfg.r == 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from ..models import score_head

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in lora_cfg.target_modules if t in present]
    if not targets:
        raise ConfigError(f"lora.target_modules: none of {lora_cfg.target_modules} is a linear layer of this model "
                          f"(it has {sorted(present)})")
    head = score_head(model)
    pcfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=targets, bias="none")
    peft_model = get_peft_model(model, pcfg)
    if not lora_cfg.only_optimize_lora:
        for p in peft_model.parameters():
            p.requires_grad_(True)
    elif head is not None:
        head.requires_grad_(True)
    return peft_model


def merge_lora(model):
    """Fold LoRA adapters into the base weights and drop the peft wrapper (no-op without LoRA)."""
    return model.merge_and_unload() if is_peft(model) else model


def enable_gradient_checkpointing(model) -> None:
    """HF gradient checkpointing (non-reentrant). With LoRA the embeddings are frozen, so the input embeddings are
    made to require grads as well: the LoRA + checkpointing combination then still reaches the adapters."""
    base = plain_hf_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "config"):
        base.config.use_cache = False
    if is_peft(trained_module(model)):
        base.enable_input_require_grads()


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed engines
# ---------------------------------------------------------------------------------------------------------
def deepspeed_config(tcfg, world_size: int, trainable: bool = True) -> dict:
    """The DeepSpeed config generated from a TrainingConfig."""
    stage = tcfg.zero_stage if trainable else (3 if tcfg.zero_stage == 3 else 0)
    zero: dict[str, Any] = {"stage": stage}
    if tcfg.offload and stage > 0:
        if trainable:
            zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": tcfg.precision == "bf16"},
        "fp16": {"enabled": tcfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if trainable and tcfg.optim.grad_clip:
        cfg["gradient_clipping"] = tcfg.optim.grad_clip
    return cfg


def _is_lora_param(name: str) -> bool:
    return "lora_" in name


def param_groups(model, weight_decay: float, lr: float, lora_lr: float | None) -> list[dict]:
    """AdamW groups: no decay for biases and norm weights (1-D tensors); LoRA adapters may get their own lr."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((p.ndim >= 2, _is_lora_param(name)), []).append(p)
    out = []
    for (decay, lora), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": (lora_lr or lr) if lora else lr})
    if not out:
        raise ConfigError("no trainable parameters (check lora settings)")
    return out


def build_engine(model, tcfg, *, lr: float | None = None, total_steps: int = 1, world_size: int | None = None,
                 trainable: bool = True, extra_config: dict | None = None):
    """`deepspeed.initialize` for one model with the config generated from `tcfg`.

    Trainable: optimizer (torch AdamW, or DeepSpeed's Adam via the DS config when `optim.optimizer` is
    `deepspeed_adam`), a transformers LR schedule with linear warmup over `warmup_ratio * total_steps` steps
    (stepped by the engine once per optimizer step), gradient checkpointing when asked. Apply LoRA BEFORE this.
    `trainable=False` (reference / reward models): no optimizer, eval mode, frozen; ZeRO-3 partitioned when
    `zero_stage == 3`, else a plain stage-0 engine. `extra_config` sections are merged into the generated
    DeepSpeed config (top-level keys replace, e.g. a `hybrid_engine` section)."""
    import deepspeed
    from transformers import get_scheduler

    world_size = world_size or rank_world()[1]
    if tcfg.precision == "fp16" and device().type == "cpu":
        raise ConfigError("precision: fp16 is not supported on CPU (DeepSpeed's CPU accelerator); use bf16 or fp32")
    cfg = {**deepspeed_config(tcfg, world_size, trainable), **(extra_config or {})}
    if not trainable:
        model.requires_grad_(False)
        model.eval()
        engine, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
        scope_zero3_linear(engine, trainable=False)
        engine.eval()
        return engine

    if tcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    o = tcfg.optim
    lr = lr or o.lr
    groups = param_groups(model, o.weight_decay, lr, tcfg.lora.lr if tcfg.lora.r else None)
    warmup = int(round(o.warmup_ratio * total_steps))

    def make_scheduler(optimizer):
        return get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    if o.optimizer == "deepspeed_adam" or (tcfg.offload and tcfg.zero_stage > 0):
        from .op_builds import adam_ops, announce_pending_builds

        announce_pending_builds(adam_ops(tcfg.offload and tcfg.zero_stage > 0))  # compiled on first use
    optimizer = None
    if o.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.adam_betas), eps=o.adam_eps)
    else:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": list(o.adam_betas), "eps": o.adam_eps,
                                                        "weight_decay": o.weight_decay}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      model_parameters=groups if optimizer is None else None,
                                      lr_scheduler=make_scheduler, config=cfg, dist_init_required=False)
    scope_zero3_linear(engine, trainable=True)
    if world_size == 1 and rank_world()[1] == 1 and engine.zero_optimization_stage() == 0:
        skip_single_process_allreduce(engine)
    engine.train()
    return engine
