"""The DeepSpeed side of training: the engine settings every trained model has (SFT, reward, PPO's actor and
critic), the optimizer, and the step loop of the supervised stages. PPO's own loop settings are in `PPOConfig`."""
from typing import Literal

from pydantic import Field

from ._base import Section


class LoraConfig(Section):
    """LoRA adapters through `peft`. `r: 0` disables LoRA."""

    r: int = Field(0, ge=0, description="LoRA rank; 0 disables LoRA (full fine-tuning).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module name suffixes that get adapters (DS-Chat's lora_module_name).",
    )
    only_optimize_lora: bool = Field(True, description="Freeze the base weights and train only the adapters.")
    lr: float | None = Field(None, gt=0, description="Learning rate for the adapters; default: the stage's lr.")
    merge: bool = Field(
        True,
        description="The artifact root is always the merged model (one from_pretrained call loads it); false also "
        "keeps the unmerged adapter in `adapter/`.",
    )


MAX_BATCH = 65536  # rows in one per-process batch; anything larger is a typo, not a plan (it fails in the job)


class AdamWConfig(Section):
    """AdamW, its LR schedule and clipping for one trained model; the peak learning rate is set by the stage."""

    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer: Literal["torch_adamw", "deepspeed_adam"] = Field(
        "torch_adamw",
        description="torch.optim.AdamW (no JIT compile) or DeepSpeed's fused/CPU Adam (JIT-compiled on first use).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="transformers LR schedule name."
    )
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of the total steps spent in linear warmup.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient norm clipping; null disables it.")


class OptimConfig(AdamWConfig):
    """AdamW, schedule and clipping with the peak learning rate (SFT, reward)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")


class EngineConfig(Section):
    """The DeepSpeed engine of one trained model: ZeRO, precision, batch rows per forward, memory savers, LoRA."""

    # An int with bounds, not Literal[0, 1, 2, 3]: the Prefect form renders an integer enum's 0 as a blank choice.
    zero_stage: int = Field(0, ge=0, le=3, strict=True, description="ZeRO stage: 0 (off), 1 (optimizer states "
                            "sharded across processes), 2 (+ gradients) or 3 (+ parameters).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state (and parameters at stage 3).")
    micro_batch_size: int = Field(
        8, ge=1, le=MAX_BATCH, description="Per-process batch size of one forward/backward."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Override the model's dropout probabilities (null keeps the model's)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")


class TrainingConfig(EngineConfig):
    """One supervised training stage (SFT, reward): the engine plus the step loop around it."""

    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Gradient accumulation steps per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (null: epochs decide).")
    max_seq_len: int = Field(256, ge=8, description="Truncate prompt+response to this many tokens.")
    seed: int = Field(1234, description="Seed for init, shuffling and dropout.")
    checkpoint_every: int = Field(0, ge=0, description="Commit a resumable checkpoint every N steps; 0 disables.")
    keep_checkpoints: int = Field(2, ge=1, description="Committed checkpoints kept per stage key (older pruned).")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 evaluates only before and after.")
    log_every: int = Field(1, ge=1, description="Print/record metrics every N steps.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
