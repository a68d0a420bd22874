"""Hybrid engine: one actor switches between training and generation without reloading.

One interface (`HybridEngine`: `generation_mode()` and `generate()`), two implementations:

- `PortableHybridEngine` (any device): entering generation mode puts the model in eval mode (dropout off), gathers
  ZeRO-3 partitioned parameters ONCE for the whole generation (not per token), merges LoRA adapters into the base
  weights, and generates with left-padded prompts; leaving it unmerges LoRA (restoring the exact base weights),
  releases the gathered parameters and restores the previous train/eval mode. It generates with our static-cache
  decode loop (`decode.StaticDecoder`, `ppo.generation`: compiled/auto) on those same weights, merged LoRA layers
  bypassed (their base layers called directly), or with HF `generate` (`hf`, and the fallback for models or
  arguments the loop does not cover, with the reason logged once).
- `DeepSpeedHybridEngine` (CUDA only): DeepSpeed's own Hybrid Engine (inference kernels, tensor-parallel
  inference). Built by passing `deepspeed_he_config(ppo_cfg)` into the engine's DeepSpeed config. With
  transformers 5 its `engine.generate` raises AttributeError, so we call `engine.eval(); engine.module.generate();
  engine.train()`, which DeepSpeed patches when it injected inference layers; where it did not (no policy for the
  model), ZeRO-3 parameters are gathered once by us as in the portable engine.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from ..errors import ConfigError
from ..models import pad_token_lists
from ..training.private_internals import (engine_hooks_suspended, has_zero3_params, hybrid_engine_injected,
                                         hybrid_engine_tp_size, zero3_gathered_without_hooks)
from ..training.engine import plain_hf_model, trained_module
from . import decode

log = logging.getLogger(__name__)
GENERATIONS = ("auto", "hf", "compiled")
_UNCHECKED = object()


def _is_ds_engine(obj) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(obj, DeepSpeedEngine)


def is_zero3(engine) -> bool:
    """True when the model's parameters are ZeRO-3 partitioned (training engine or ZeRO-3 inference engine)."""
    if _is_ds_engine(engine) and engine.zero_optimization_stage() == 3:
        return True
    return has_zero3_params(trained_module(engine))


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation. -> (input_ids [B, P], attention_mask [B, P])"""
    ids, mask = pad_token_lists(seqs, pad_id, "left")
    return ids.to(device), mask.to(device)


def _lora_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class HybridEngine:
    """Interface: `with he.generation_mode() as model:` yields a module ready for `model.generate`, and
    `he.generate(input_ids, attention_mask, **kwargs) -> sequences [B, P + N]` does one generation in that mode."""

    name = "abstract"
    choice = "transformers' generate"  # how it generates and why (the stage log prints it)

    def __init__(self, engine):
        self.engine = engine
        self.module = trained_module(engine)
        self.last_gather_s = 0.0

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[torch.nn.Module]:  # pragma: no cover - interface
        raise NotImplementedError
        yield

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **gen_kwargs) -> torch.Tensor:
        """Generate from left-padded prompts. input_ids, attention_mask [B, P] -> sequences [B, P + N]."""
        with self.generation_mode() as model:
            return self._generate_in_mode(model, input_ids, attention_mask, gen_kwargs)

    def _generate_in_mode(self, model, input_ids, attention_mask, gen_kwargs: dict) -> torch.Tensor:
        return hf_generate(model, input_ids, attention_mask, gen_kwargs)


def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_kwargs: dict) -> torch.Tensor:
    """HF `generate` with the KV cache. input_ids, attention_mask [B, P] -> sequences [B, P + N]"""
    gen_kwargs = {"use_cache": True, **gen_kwargs}
    if gen_kwargs.get("min_new_tokens") and gen_kwargs.get("min_length") is None:
        # `generate` turns min_new_tokens into min_length = prompt width + min_new_tokens AND keeps a second
        # processor for min_new_tokens: two identical EOS masks (arange, isin, clone, where) per token. The
        # prompts are left-padded to one width, so min_length alone masks exactly the same positions.
        gen_kwargs["min_length"] = input_ids.shape[1] + gen_kwargs.pop("min_new_tokens")
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)


def resolve_generation(setting: str, dev: torch.device) -> tuple[str, bool, str]:
    """`ppo.generation` on this device -> (path: "static" or "hf", compile the decode step?, why)."""
    if setting == "hf":
        return "hf", False, "ppo.generation=hf: transformers' generate"
    if setting == "compiled":
        return "static", True, "ppo.generation=compiled: static-cache decode loop, decode step torch.compile'd"
    if setting != "auto":
        raise ConfigError(f"ppo.generation: unknown {setting!r} ({', '.join(GENERATIONS)})")
    if dev.type == "cuda":
        return "static", True, ("auto on CUDA: static-cache decode loop, step torch.compile'd with CUDA graphs "
                                "(eager decoding is bound by kernel launches at small batch)")
    return "static", False, ("auto on CPU: static-cache decode loop with an eager step (a torch.compile'd step is "
                             "faster per token, but compiling it takes minutes on CPU, more than the whole "
                             "generation time of a small stage; ppo.generation=compiled forces it)")


class PortableHybridEngine(HybridEngine):
    """Ours, any device and any architecture `generate` supports. `gather_zero3=False` keeps DS-Chat's slow path
    (parameters fetched layer by layer for every token) for benchmarking; never use it for training."""

    name = "portable"

    def __init__(self, engine, gather_zero3: bool = True, generation: str = "auto"):
        super().__init__(engine)
        self.gather_zero3 = gather_zero3
        dev = next(self.module.parameters()).device
        self.path, compile_step, self.choice = resolve_generation(generation, dev)
        # prompt widths are bucketed so a compiled step sees repeating shapes; an eager step would only pay the
        # bucket's padding columns in every prefill
        self.decoder = decode.StaticDecoder(plain_hf_model(self.module), compile_step=compile_step,
                                            bucket=16 if compile_step else 1,
                                            check_every=8 if dev.type == "cuda" else 1)
        self.last_compile_s = 0.0
        self._model_reason: str | None | object = _UNCHECKED  # why the loop cannot run this model (None: it can)
        self._noted: set[str] = set()

    def _generate_in_mode(self, model, input_ids, attention_mask, gen_kwargs: dict) -> torch.Tensor:
        self.last_compile_s = 0.0
        settings, reason = self._static_settings(gen_kwargs) if self.path == "static" else (None, None)
        if settings is None:
            if reason is not None and reason not in self._noted:
                self._noted.add(reason)
                log.warning("ppo.generation: HF generate instead of the static-cache decode loop: %s", reason)
            return hf_generate(model, input_ids, attention_mask, gen_kwargs)
        before = self.decoder.compile_s
        with _lora_bypassed(model):
            out = self.decoder.generate(input_ids, attention_mask, settings)
        self.last_compile_s = self.decoder.compile_s - before
        return out

    def _static_settings(self, gen_kwargs: dict) -> tuple[decode.SamplingSettings | None, str | None]:
        """(settings, None) when the decode loop covers this model and these arguments, else (None, why not)."""
        if self._model_reason is _UNCHECKED:  # checked once, inside generation mode (ZeRO-3 weights gathered)
            self._model_reason = decode.unsupported_reason(self.decoder.model)
        if self._model_reason is not None:
            return None, self._model_reason
        return decode.settings_from_generate_kwargs(self.decoder.model, gen_kwargs)

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[torch.nn.Module]:
        module = self.module
        was_training = module.training
        zero3 = is_zero3(self.engine)
        with contextlib.ExitStack() as stack:
            module.eval()  # dropout off
            stack.callback(module.train, was_training)
            gathered = False
            if zero3 and self.gather_zero3:
                # the weights are all here for the whole generation: ZeRO-3's per-module fetch/release hooks would
                # only add overhead to every layer of every generated token. Nothing is written back on exit, so
                # LoRA merges below are discarded with the gathered copies.
                gather_s = stack.enter_context(zero3_gathered_without_hooks(self.engine, module))
                gathered = gather_s is not None
                self.last_gather_s = gather_s or 0.0
            elif not zero3:
                # the DeepSpeed engine's own forward pre/post hooks (timers, profiler bookkeeping of a training
                # forward) would otherwise run for every generated token
                stack.enter_context(engine_hooks_suspended(self.engine))
            loras = _lora_layers(module)
            if loras and (gathered or not zero3):  # never merge into partitioned (empty) ZeRO-3 weights
                stack.enter_context(_merged_lora(loras, restore_exact=not zero3))
            yield module


@contextlib.contextmanager
def inference_forward(engine) -> Iterator[None]:
    """For no-grad forwards of an engine (the experience pass of actor, reference, critic and reward model).

    ZeRO-3 (parameters not offloaded): the parameters are gathered ONCE for the whole forward and the per-module
    fetch/release hooks are taken out, as for generation; otherwise the engine's own forward hooks are taken out.
    The forward sees the same weights and runs the same kernels, so its outputs are identical; only the per-layer
    bookkeeping (and, with one process, a collective per module) is saved. Wrappers (e.g. `Offloaded`) pass."""
    if not _is_ds_engine(engine):
        yield
        return
    if is_zero3(engine):
        offload = engine.zero_offload_param() if hasattr(engine, "zero_offload_param") else None
        if offload is not None and getattr(offload, "device", "none") not in (None, "none"):
            yield  # offloaded parameters: keep DeepSpeed's layer-by-layer fetching (bounded device memory)
            return
        with zero3_gathered_without_hooks(engine, trained_module(engine)):
            yield
        return
    with engine_hooks_suspended(engine):
        yield


@contextlib.contextmanager
def _lora_bypassed(module: torch.nn.Module) -> Iterator[None]:
    """Merged LoRA layers replaced by their base layers in the module tree (a merged layer's forward only calls its
    base layer, through peft's per-call argument checks and adapter bookkeeping); put back on exit."""
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if getattr(child, "merged", False) and hasattr(child, "get_base_layer")]
    for parent, name, child in swaps:
        setattr(parent, name, child.get_base_layer())
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


@contextlib.contextmanager
def _merged_lora(loras: list, restore_exact: bool):
    """Merge LoRA adapters into the base weights; on exit unmerge and (when the weights persist, i.e. not inside a
    ZeRO-3 gather) copy the original base weights back so merge/unmerge rounding never drifts the model."""
    saved = [m.get_base_layer().weight.detach().clone() for m in loras] if restore_exact else None
    for m in loras:
        m.merge()
    try:
        yield
    finally:
        for i, m in enumerate(loras):
            m.unmerge()
            if saved is not None:
                m.get_base_layer().weight.data.copy_(saved[i])


def deepspeed_he_config(max_out_tokens: int, inference_tp_size: int = 1, tp_gather_partition_size: int = 8,
                        release_inference_cache: bool = False, pin_parameters: bool = True) -> dict:
    """The `hybrid_engine` section of a DeepSpeed config (merge into the actor's config to get a
    DeepSpeedHybridEngine from deepspeed.initialize)."""
    return {"hybrid_engine": {"enabled": True, "max_out_tokens": int(max_out_tokens),
                              "inference_tp_size": int(inference_tp_size),
                              "tp_gather_partition_size": int(tp_gather_partition_size),
                              "release_inference_cache": bool(release_inference_cache),
                              "pin_parameters": bool(pin_parameters)}}


def check_deepspeed_he_supported(zero_stage: int, inference_tp_size: int = 1) -> None:
    """Raise ConfigError with the reason when DeepSpeed's Hybrid Engine cannot run here."""
    if not torch.cuda.is_available():
        raise ConfigError("ppo.hybrid_engine: 'deepspeed' needs CUDA (DeepSpeed's Hybrid Engine swaps in CUDA-only "
                          "inference layers); use ppo.hybrid_engine=portable on this machine")
    if inference_tp_size > 1 and zero_stage != 3:
        raise ConfigError("ppo.inference_tp_size > 1 needs ppo.actor.zero_stage=3 (DeepSpeed Hybrid Engine rule)")


class DeepSpeedHybridEngine(HybridEngine):
    """DeepSpeed's Hybrid Engine behind our interface (CUDA only). `engine` must come from deepspeed.initialize
    with `deepspeed_he_config(...)` merged into its config."""

    name = "deepspeed"
    choice = "DeepSpeed's Hybrid Engine (its patched generate; ppo.generation does not apply)"

    def __init__(self, engine):
        from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine as _DSHE

        if not isinstance(engine, _DSHE):
            raise ConfigError("ppo.hybrid_engine=deepspeed: the actor engine was not built with a `hybrid_engine` "
                              "section (deepspeed_he_config); got " + type(engine).__name__)
        check_deepspeed_he_supported(engine.zero_optimization_stage(),
                                     hybrid_engine_tp_size(engine))
        super().__init__(engine)

    @property
    def injected(self) -> bool:
        """Whether DeepSpeed swapped in its inference layers (else generation runs HF's own code)."""
        return hybrid_engine_injected(self.engine)

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[torch.nn.Module]:
        engine = self.engine
        was_training = engine.module.training
        engine.eval()
        try:
            with contextlib.ExitStack() as stack:
                if not self.injected and engine.zero_optimization_stage() == 3:
                    from deepspeed.runtime.zero import GatheredParameters

                    stack.enter_context(GatheredParameters(list(engine.module.parameters()), modifier_rank=None))
                if not self.injected:
                    loras = _lora_layers(engine.module)
                    if loras:
                        stack.enter_context(_merged_lora(loras, restore_exact=engine.zero_optimization_stage() != 3))
                # when injected, engine.module.generate is DeepSpeed's patched generate (gathers, fuses LoRA)
                yield engine.module
        finally:
            engine.train(was_training)


def make_hybrid_engine(kind: str, engine, generation: str = "auto") -> HybridEngine:
    """`portable` (generating as `generation` says: ppo.generation) or `deepspeed` (ppo.hybrid_engine)."""
    if kind == "portable":
        return PortableHybridEngine(engine, generation=generation)
    if kind == "deepspeed":
        return DeepSpeedHybridEngine(engine)
    raise ConfigError(f"ppo.hybrid_engine: unknown {kind!r} (portable or deepspeed)")
