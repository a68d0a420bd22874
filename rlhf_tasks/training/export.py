"""HF export: a consolidated, plain Hugging Face folder (ZeRO-3 gathered, LoRA merged, safetensors)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .distributed import barrier
from .engine import is_peft, plain_hf_model, trained_module


def full_state_dict(engine_or_model, rank: int) -> dict[str, torch.Tensor] | None:
    """The trained module's complete state dict (`trained_module`: without a `ScoreHead` prefix) as CPU tensors on
    rank 0 (ZeRO-3 parameters gathered; every rank must call this); None on other ranks."""
    module = trained_module(engine_or_model)
    zero3 = hasattr(engine_or_model, "zero_optimization_stage") and engine_or_model.zero_optimization_stage() == 3
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with ctx:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_hf(engine, tokenizer, out_dir: str | Path, rank: int, *, keep_adapter: bool = False) -> None:
    """Write a plain HF folder (config, safetensors weights, tokenizer) that `from_pretrained` loads.

    ZeRO-3 parameters are gathered; LoRA adapters are merged into the base weights (with `keep_adapter` the
    unmerged adapter is also written to `adapter/`). All ranks must call this; rank 0 writes."""
    module = trained_module(engine)
    sd = full_state_dict(engine, rank)
    if rank == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
        if is_peft(module):
            from peft import get_peft_model

            base = module.get_base_model()
            with torch.device("cpu"):
                fresh = type(base)(base.config)
            fresh = get_peft_model(fresh, module.peft_config["default"])
            fresh.load_state_dict(sd)
            if keep_adapter:
                fresh.save_pretrained(out_dir / "adapter")
            plain = fresh.merge_and_unload().to(dtype)
            plain.config.use_cache = True
            plain.save_pretrained(out_dir)
        else:
            plain_hf_model(module).save_pretrained(out_dir, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    barrier()
