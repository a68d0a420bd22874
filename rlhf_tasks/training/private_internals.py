"""Every place we reach into a library's private internals (DeepSpeed, torch, transformers), and nothing else does.

Each patch or accessor lists what it relies on in `RELIES_ON` (dotted names resolved by `missing_internals`) and
checks it again where it applies; `tests/test_private_internals.py` asserts every name resolves in the installed
versions, so an upgrade that removes one fails a test, not a user's run. No patch fails soft and silently: when what it
relies on is missing it either raises `DeepSpeedInternalsError`, or (where DeepSpeed's unpatched path is still
correct, only slower; each says which) logs a warning and takes that path. Patches are also applied only on the
DeepSpeed versions they were verified on (`VERIFIED_DEEPSPEED`); on others the unpatched path runs, with a warning.

  install_single_process_collectives   one CPU process: collectives as local copies       (fallback: gloo)
  skip_single_process_allreduce        one process at ZeRO-0: no gradient all-reduce    (fallback: all-reduce)
  scope_zero3_linear                   ZeRO-3's F.linear only inside its training engine  (fallback: global)
  weights_only_torch_load              DeepSpeed's checkpoint loads with weights_only=True       (raises)
  engine_hooks_suspended / zero3_gathered_without_hooks   inference forwards without per-module hooks
                                                                      (fallback: DeepSpeed's hooks run)
  hybrid_engine_injected / _tp_size    DeepSpeed Hybrid Engine: inference layers injected? its TP size (raise)
  supports_static_cache                transformers: the model compiles with a static cache  (fallback: generate)
  attention_implementation             transformers: the attention kernel a config selected     (unset: eager)
  op_build_pending                     DeepSpeed/torch: would loading this op JIT-compile it now?  (unknown: yes)
  op_build_lock                        torch: the lock file a load holds while it checks/compiles (unknown: None)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import time
from typing import Iterator

import torch

log = logging.getLogger(__name__)

# [lowest, highest) DeepSpeed versions the patches were verified on (the test suite runs on the installed one)
VERIFIED_DEEPSPEED = ("0.19.0", "0.20.0")

_COLLECTIVES = ("all_gather_into_tensor", "all_gather_base", "reduce_scatter_tensor", "all_gather", "all_reduce",
                "all_reduce_coalesced", "broadcast", "reduce")
_DS_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                    "deepspeed.runtime.zero.config.ZeroStageEnum",
                    "deepspeed.utils.tensor_fragment.fragment_address")

# What each patch relies on, as dotted names (module path, then attributes). Instance attributes that DeepSpeed
# sets in __init__ are checked on live engines (`ENGINE_ATTRIBUTES`) by the test and where the patch applies.
RELIES_ON: dict[str, tuple[str, ...]] = {
    "single_process_collectives": ("deepspeed.comm.comm.cdb",)
    + tuple(f"deepspeed.comm.torch.TorchBackend.{name}" for name in _COLLECTIVES),
    "zero3_linear_scope": ("deepspeed.runtime.zero.linear.zero3_linear_wrap",
                           "deepspeed.runtime.zero.partition_parameters.InsertPostInitMethodToModuleSubClasses"),
    "weights_only_torch_load": _DS_SAFE_GLOBALS
    + ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.load",
       "torch.serialization.safe_globals"),
    "zero3_hooks": ("deepspeed.runtime.zero.parameter_offload.ZeROOrderedDict",
                    "deepspeed.runtime.zero.parameter_offload.DeepSpeedZeRoOffload",
                    "deepspeed.runtime.zero.GatheredParameters"),
    "hooks_suspended": ("torch.utils.hooks.RemovableHandle",),
    "hybrid_engine_injected": ("deepspeed.runtime.hybrid_engine.DeepSpeedHybridEngine",),
    "static_cache_support": ("transformers.PreTrainedModel._can_compile_fullgraph",),
    "attention_implementation": ("transformers.PretrainedConfig._attn_implementation",),
    "op_build_pending": ("deepspeed.git_version_info.installed_ops", "deepspeed.git_version_info.accelerator_name",
                         "torch.utils.cpp_extension._get_build_directory"),
    "op_build_lock": ("torch.utils.cpp_extension._get_build_directory", "torch.utils.file_baton.FileBaton"),
}
ENGINE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skip_single_process_allreduce": ("enable_backward_allreduce",),            # any engine
    "engine_hooks": ("module_forward_pre_hook", "module_forward_post_hook"),    # any engine
    "zero3_hooks": ("forward_hooks", "backward_hooks", "fwd_pre_hook"),         # ZeRO-3: _zero3_offload(engine)
    "zero3_linear_scope": ("linear_bk",),                                        # the patcher, once ZeRO-3 ran
    "hooks_suspended": ("hooks_dict_ref", "id"),                                 # a torch RemovableHandle
    "hybrid_engine_injected": ("_inference_containers", "_config"),              # a DeepSpeedHybridEngine
    "zero3_params": ("ds_id",),                                                  # a ZeRO-3 parameter
}


class DeepSpeedInternalsError(RuntimeError):
    """A private DeepSpeed/torch attribute a patch needs is gone (an upgrade): the message names it."""


def resolve(dotted: str):
    """The object a dotted name points to (longest importable module prefix, then attributes); AttributeError or
    ImportError when it does not exist."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def missing_internals(patch: str | None = None) -> list[str]:
    """The dotted names of `RELIES_ON` (of one patch, or all) that do not resolve in the installed versions."""
    patches = [patch] if patch else list(RELIES_ON)
    return [name for p in patches for name in _missing_names(p)]


@functools.lru_cache(maxsize=None)
def _missing_names(patch: str) -> tuple[str, ...]:
    # cached: the installed versions do not change within a process, and some patches apply on every forward
    out = []
    for name in RELIES_ON[patch]:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            out.append(name)
    return tuple(out)


def missing_attributes(obj, patch: str) -> list[str]:
    """`ENGINE_ATTRIBUTES[patch]` that `obj` lacks."""
    return [a for a in ENGINE_ATTRIBUTES[patch] if not hasattr(obj, a)]


_warned: set[str] = set()


def _warn_once(patch: str, message: str) -> None:
    if patch not in _warned:
        _warned.add(patch)
        log.warning("%s: %s", patch, message)


def deepspeed_version_verified(patch: str) -> bool:
    """Whether the installed DeepSpeed is one `patch` was verified on; warns once (naming the patch) if not."""
    import deepspeed
    from packaging.version import Version

    lo, hi = (Version(v) for v in VERIFIED_DEEPSPEED)
    ok = lo <= Version(deepspeed.__version__) < hi
    if not ok:
        _warn_once(f"{patch}-version", f"deepspeed {deepspeed.__version__} is outside the versions this patch was "
                                       f"verified on ({VERIFIED_DEEPSPEED[0]} <= v < {VERIFIED_DEEPSPEED[1]}); "
                                       "using DeepSpeed's unpatched path")
    return ok


def _usable(patch: str, missing: list[str]) -> bool:
    """For patches whose unpatched path is still correct: False (with a warning) when something is missing."""
    if missing:
        _warn_once(patch, f"this DeepSpeed lacks {', '.join(missing)}; using DeepSpeed's unpatched path (correct, "
                          "slower)")
        return False
    return deepspeed_version_verified(patch)


# ---------------------------------------------------------------------------------------------------------
# single-process collectives and all-reduce (unpatched path: correct, slower)
# ---------------------------------------------------------------------------------------------------------
class _Done:
    """The handle of a collective that already completed (what torch's Work offers that DeepSpeed uses)."""

    def wait(self, *_, **__) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self):
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut


def install_single_process_collectives() -> None:
    """One CPU process: make DeepSpeed's collectives local copies on the calling thread.

    With one rank every collective is an identity (all-gather / reduce-scatter: output = input; all-reduce,
    broadcast, reduce: nothing), but gloo still runs each one on its own worker thread (a thread hand-off per ZeRO-3
    parameter fetch and gradient reduction), and the copies it makes there start a second OpenMP thread team. Once
    a process holds more OpenMP threads than cores, libgomp stops spinning between parallel regions in EVERY team,
    so each small op of the main thread pays a futex wake-up: after the first ZeRO-3 engine, generation and
    training ran ~3x slower with 2 threads on 2 cores. Results are bit-identical (the same values are copied)."""
    # Not a context manager: it patches DeepSpeed's communication backend object (`cdb`) of a one-process group,
    # which lives as long as the process. Unpatched path (something missing): gloo's collectives, correct, slower.
    if not _usable("single_process_collectives", missing_internals("single_process_collectives")):
        return
    import deepspeed.comm.comm as ds_comm

    cdb = ds_comm.cdb
    if cdb is None or getattr(cdb, "_rlhf_single_process", False):
        return
    if not _usable("single_process_collectives", [f"cdb.{n}" for n in _COLLECTIVES if not hasattr(cdb, n)]):
        return

    def done(async_op):
        return _Done() if async_op else None

    def copy_into(out, inp):
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp.reshape(out.shape))

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        copy_into(output_tensor, input_tensor)
        return done(async_op)

    def reduce_scatter_tensor(output_tensor, input_tensor, op=None, group=None, async_op=False):
        copy_into(output_tensor, input_tensor)
        return done(async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        copy_into(tensor_list[0], tensor)
        return done(async_op)

    def all_reduce(tensor, op=None, group=None, async_op=False):
        return done(async_op)

    def all_reduce_coalesced(tensors, op=None, group=None, async_op=False):
        return done(async_op)

    cdb.all_gather_into_tensor = all_gather_into_tensor
    cdb.all_gather_base = all_gather_into_tensor
    cdb.reduce_scatter_tensor = reduce_scatter_tensor
    cdb.all_gather = all_gather
    cdb.all_reduce = all_reduce
    cdb.all_reduce_coalesced = all_reduce_coalesced
    cdb.broadcast = lambda tensor, src, group=None, async_op=False: done(async_op)
    cdb.reduce = lambda tensor, dst, op=None, group=None, async_op=False: done(async_op)
    cdb._rlhf_single_process = True


def skip_single_process_allreduce(engine) -> None:
    """One process at ZeRO-0: DeepSpeed's gradient all-reduce (flatten every gradient, all_reduce through gloo's
    worker thread, multiply by 1/1, copy back) is an exact identity that costs a few ms per optimizer step; the
    engine reads `enable_backward_allreduce` before it. Unpatched path (attribute gone): the all-reduce runs."""
    if _usable("skip_single_process_allreduce", missing_attributes(engine, "skip_single_process_allreduce")):
        engine.enable_backward_allreduce = False


# ---------------------------------------------------------------------------------------------------------
# ZeRO-3's memory-efficient linear, scoped to its training engine (unpatched path: correct, slower)
# ---------------------------------------------------------------------------------------------------------
def scope_zero3_linear(engine, trainable: bool) -> None:
    """Confine DeepSpeed's ZeRO-3 "memory efficient linear" to where it matters.

    Building a ZeRO-3 engine replaces `torch.nn.functional.linear` PROCESS-WIDE, for good, with a Python
    autograd.Function (it keeps only the partitioned weight for backward, so gathered weights are not held until
    backward). Every linear of every model in the process (ZeRO-0 engines, frozen models, generation, plain copies)
    then pays its Python overhead. Here torch's linear is put back, and the wrapper is switched on only for the
    grad-enabled forwards and the backward (activation-checkpointing recomputation must save the same tensors as
    the forward) of this trainable ZeRO-3 engine: the memory behaviour of ZeRO-3 training is unchanged,
    inference forwards save nothing for backward anyway, and both compute the same values. So a trainable ZeRO-3
    model must be called through its engine (`engine(...)`), never through `engine.module`.
    Unpatched path (something missing): DeepSpeed's process-wide replacement stays, correct and slower."""
    import torch.nn.functional as F

    if not _usable("zero3_linear_scope", missing_internals("zero3_linear_scope")):
        return
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as _Patcher

    if F.linear is not zero3_linear_wrap:  # not a ZeRO-3 engine, or an earlier one restored torch's linear
        if engine.zero_optimization_stage() == 3 and F.linear is not getattr(_Patcher, "linear_bk", F.linear):
            _warn_once("zero3_linear_scope", f"F.linear is {F.linear!r}, neither torch's nor DeepSpeed's ZeRO-3 "
                                             "linear; leaving it as it is")
        return
    # DeepSpeed keeps torch's linear as `linear_bk` when it swaps its own in
    if not _usable("zero3_linear_scope", missing_attributes(_Patcher, "zero3_linear_scope")):
        return
    original = _Patcher.linear_bk
    F.linear = original
    if not trainable:
        return

    def scoped(inner, grad_only: bool):
        def call(*args, **kwargs):
            if (grad_only and not torch.is_grad_enabled()) or F.linear is not original:
                return inner(*args, **kwargs)
            F.linear = zero3_linear_wrap
            try:
                return inner(*args, **kwargs)
            finally:
                F.linear = original

        return call

    engine.forward = scoped(engine.forward, grad_only=True)
    engine.backward = scoped(engine.backward, grad_only=False)


# ---------------------------------------------------------------------------------------------------------
# checkpoints: weights_only loading (no unpatched path: raises)
# ---------------------------------------------------------------------------------------------------------
def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and containers (loss scalers, the ZeRO
    stage enum, fragment addresses). They carry plain attributes only; allow-listing them keeps `weights_only=True`
    loading. One that is gone is reported with a warning: its checkpoints then fail to load with a clear
    `UnpicklingError` naming the class (never an unsafe load)."""
    out = []
    for name in _DS_SAFE_GLOBALS:
        try:
            out.append(resolve(name))
        except (ImportError, AttributeError):
            _warn_once(f"safe-global {name}", f"{name} is gone from this DeepSpeed; checkpoints that pickle it "
                                              "will refuse to load")
    return out


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Force `torch.load(..., weights_only=True)` for everything loaded inside (DeepSpeed's checkpoint engine passes
    False, and looks `torch.load` up at call time). Scoped: the original is back on exit. No fallback: without
    torch's `safe_globals` this raises, since the unpatched path would unpickle whatever a checkpoint holds."""
    missing = missing_internals("weights_only_torch_load")
    if "torch.serialization.safe_globals" in missing:
        raise DeepSpeedInternalsError("torch.serialization.safe_globals is missing: checkpoints cannot be loaded "
                                      "with weights_only=True on this torch")
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = original


# ---------------------------------------------------------------------------------------------------------
# inference forwards without DeepSpeed's per-module hooks (unpatched path: correct, slower)
# ---------------------------------------------------------------------------------------------------------
def _zero3_offload(engine):
    """DeepSpeed's ZeRO-3 parameter manager of an engine (trainable: inside the optimizer; frozen: the optimizer)."""
    opt = getattr(engine, "optimizer", None)
    return getattr(opt, "parameter_offload", opt if hasattr(opt, "forward_hooks") else None)


def _engine_hook_handles(engine) -> list | None:
    """The forward pre/post hooks a DeepSpeed engine puts on its module (run on every forward of the module);
    None when this DeepSpeed does not keep them where we look."""
    if missing_attributes(engine, "engine_hooks"):
        return None
    return [h for h in (engine.module_forward_pre_hook, engine.module_forward_post_hook) if h is not None]


def _handles_usable(patch: str, handles: list | None, missing: list[str]) -> bool:
    if handles is not None:
        missing = missing + sorted({a for h in handles for a in missing_attributes(h, "hooks_suspended")})
    return _usable(patch, missing)


@contextlib.contextmanager
def _hooks_suspended(handles: list) -> Iterator[None]:
    """Take hooks out of their module's hook dictionaries; put back exactly, in their original order, on exit."""
    saved: dict[int, tuple[dict, dict]] = {}
    for h in handles:
        d = h.hooks_dict_ref()
        if d is None:  # the module is gone
            continue
        if id(d) not in saved:
            saved[id(d)] = (d, dict(d))
        d.pop(h.id, None)
    try:
        yield
    finally:
        for d, snapshot in saved.values():
            d.clear()
            d.update(snapshot)


@contextlib.contextmanager
def engine_hooks_suspended(engine) -> Iterator[None]:
    """Take the DeepSpeed engine's own module forward hooks (timers, profiler bookkeeping of a training forward)
    out for the duration (inference forwards called on the module directly, no gradients). Unpatched path (the
    hook attributes are gone): the hooks run, correct and slower."""
    handles = _engine_hook_handles(engine)
    if not _handles_usable("engine_hooks", handles, missing_attributes(engine, "engine_hooks")):
        yield
        return
    with _hooks_suspended(handles):
        yield


@contextlib.contextmanager
def zero3_gathered_without_hooks(engine, module: torch.nn.Module) -> Iterator[float | None]:
    """ZeRO-3: gather `module`'s partitioned parameters ONCE for the whole block (every rank gets the full weights;
    nothing is written back on exit) and take ZeRO-3's per-module fetch/release hooks out, with the engine's own
    forward hooks (whose prologue would re-wrap every module's parameter dict on each call) and the parameter dicts
    ZeRO-3 swapped in (a getter that checks/fetches on each access). Only valid without gradients. Yields the
    gather time in seconds; everything is put back exactly on exit.
    Unpatched path (something missing): yields None and gathers nothing; DeepSpeed's layer-by-layer fetching runs,
    correct and slower (callers must not merge LoRA into partitioned weights then)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict

    offload = _zero3_offload(engine)
    missing = missing_internals("zero3_hooks") + (["optimizer.parameter_offload"] if offload is None else
                                                  missing_attributes(offload, "zero3_hooks"))
    handles = None
    if not missing:
        handles = list(offload.forward_hooks) + list(offload.backward_hooks) + [offload.fwd_pre_hook]
        engine_handles = _engine_hook_handles(engine)
        missing += missing_attributes(engine, "engine_hooks")
        handles += engine_handles or []
    if not _handles_usable("zero3_hooks", handles, missing):
        yield None
        return
    t0 = time.perf_counter()
    with GatheredParameters(list(module.parameters()), modifier_rank=None):
        gather_s = time.perf_counter() - t0
        swapped = [(m, m._parameters) for m in module.modules() if isinstance(m._parameters, ZeROOrderedDict)]
        for m, d in swapped:
            m._parameters = dict(d.items())
        try:
            with _hooks_suspended(handles):
                yield gather_s
        finally:
            for m, d in swapped:
                m._parameters = d


def has_zero3_params(module: torch.nn.Module) -> bool:
    """Whether a module's parameters are ZeRO-3 partitioned (DeepSpeed tags each with a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed's Hybrid Engine (no unpatched path: raises)
# ---------------------------------------------------------------------------------------------------------
def hybrid_engine_injected(engine) -> bool:
    """Whether DeepSpeed's Hybrid Engine swapped in its inference layers (else generation runs HF's own code)."""
    if missing_attributes(engine, "hybrid_engine_injected"):
        raise DeepSpeedInternalsError("DeepSpeedHybridEngine._inference_containers is gone from this DeepSpeed: "
                                      "cannot tell whether inference layers were injected (use "
                                      "ppo.hybrid_engine=portable)")
    return len(engine._inference_containers) > 0


def hybrid_engine_tp_size(engine) -> int:
    """The `hybrid_engine.inference_tp_size` a DeepSpeedHybridEngine was built with (its parsed config)."""
    if missing_attributes(engine, "hybrid_engine_injected"):
        raise DeepSpeedInternalsError("DeepSpeedHybridEngine._config is gone from this DeepSpeed (use "
                                      "ppo.hybrid_engine=portable)")
    return engine._config.hybrid_engine.inference_tp_size


# ---- transformers ---------------------------------------------------------------------------------------------
def supports_static_cache(model) -> bool:
    """transformers' own flag (`_can_compile_fullgraph`) for a model whose forward runs with a static cache. Gone
    (an upgrade): False, and PPO's static decoder is not used (its fallback is `generate`)."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def attention_implementation(config) -> str:
    """The attention kernel transformers selected for a model's `config` (`_attn_implementation`: "sdpa",
    "eager", "flash_attention_2", ...); unset means eager."""
    return getattr(config, "_attn_implementation", None) or "eager"


def op_build_pending(builder) -> str | None:
    """The folder a DeepSpeed op builder would JIT-compile into when `builder.load()` ran now, or None when it
    would not compile: the op came prebuilt with DeepSpeed (`installed_ops`, same accelerator), or torch's
    extension folder (`_get_build_directory`, under TORCH_EXTENSIONS_DIR) already holds its compiled module.
    What `OpBuilder.load` and `torch.utils.cpp_extension.load` decide from (ninja still checks the sources, which
    costs a second). With those names gone: the folder is unknown and a build is assumed (`"?"`), which only
    announces a build that may not come."""
    import os

    if missing_internals("op_build_pending"):
        _warn_once("op_build_pending", f"cannot tell whether DeepSpeed op {builder.name} is compiled yet "
                   f"({', '.join(missing_internals('op_build_pending'))} missing); announcing a build")
        return "?"
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(builder.name, False) and accelerator_name == get_accelerator().device_name():
        return None
    folder = _get_build_directory(builder.name, verbose=False)
    return None if os.path.exists(os.path.join(folder, f"{builder.name}.so")) else folder


def op_build_lock(builder) -> str | None:
    """The lock file torch's `cpp_extension.load` holds while it checks and (re)compiles a DeepSpeed op:
    `<build folder>/lock`, a `FileBaton` made with O_EXCL and removed on release. A process killed while holding it
    leaves it behind, and every later load of the op then waits for it forever (`FileBaton.wait` polls for the
    file). None when the names this relies on are gone (then nothing can be said about the lock)."""
    import os

    if missing_internals("op_build_lock"):
        return None
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(builder.name, verbose=False), "lock")
