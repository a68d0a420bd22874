"""The one training core shared by SFT, the reward model and PPO.

Pieces (each usable on its own; PPO uses them directly, SFT and reward go through `train_stage`):
  - distributed setup: `init_distributed`, `device`, `barrier`, `all_reduce_sum`, `destroy_distributed`;
  - engines: `deepspeed_config`, `build_engine` (ZeRO 0-3, precision, offload, accumulation, clipping, warmup
    schedule, torch AdamW or DeepSpeed Adam, gradient checkpointing), `apply_lora` / `merge_lora`, `unwrap`;
  - output: `save_hf` (a plain HF folder, ZeRO-3 gathered, LoRA merged, safetensors);
  - `CheckpointManager`: full training checkpoints committed to the store, resume from the latest verifying one,
    loaded without unpickling anything but tensors and plain containers;
  - `MetricsLogger`: progress lines on stdout, history, TensorBoard events, metrics.json;
  - `train_stage`: the step loop with deterministic sharded batches, periodic eval, checkpoints and resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..launch import free_port
from ..models import pad_token_lists

# ---------------------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------------------
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed and return (rank, world_size).

    Works under torchrun / the deepspeed launcher (rendezvous variables set) and alone: a lone process gets
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 and a free MASTER_PORT (without them DeepSpeed tries
    MPI discovery and fails). Backend: gloo on CPU, the accelerator's (nccl) otherwise. Idempotent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    elif torch.distributed.get_world_size() == 1:
        _single_process_collectives()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


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


def _single_process_collectives() -> None:
    """One CPU process: make DeepSpeed's collectives local copies on the calling thread.

    With one rank every collective is an identity (all-gather / reduce-scatter: output = input; all-reduce,
    broadcast, reduce: nothing), but gloo still runs each one on its own worker thread (a thread hand-off per ZeRO-3
    parameter fetch and gradient reduction), and the copies it makes there start a second OpenMP thread team. Once
    a process holds more OpenMP threads than cores, libgomp stops spinning between parallel regions in EVERY team,
    so each small op of the main thread pays a futex wake-up: after the first ZeRO-3 engine, generation and
    training ran ~3x slower with 2 threads on 2 cores. Results are bit-identical (the same values are copied)."""
    try:
        import deepspeed.comm.comm as ds_comm
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    cdb = getattr(ds_comm, "cdb", None)
    if cdb is None or getattr(cdb, "_rlhf_single_process", False):
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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def device() -> torch.device:
    """The accelerator device of this process (DeepSpeed's choice: `DS_ACCELERATOR`, else auto-detected)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def torch_dtype(precision: str) -> torch.dtype:
    """fp32 / bf16 / fp16 -> torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor) -> list[float]:
    """Sum a short vector of floats over all ranks (float64 on CPU, gloo-safe)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if rank_world()[1] > 1:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            t = t.to(device())
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def destroy_distributed() -> None:
    """Tear the process group down (a clean exit; avoids an abort at interpreter exit seen with ZeRO-3)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        try:  # DeepSpeed's variant also drops its cached groups, so a later init in this process works
            import deepspeed.comm as ds_comm

            ds_comm.destroy_process_group()
        except Exception:  # pragma: no cover - DeepSpeed never initialised its comm backend
            torch.distributed.destroy_process_group()


def local_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on local rank 0 first (downloads, builds into a shared cache), then on the other ranks."""
    if local_rank() == 0:
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads() -> None:
    """One process per rank shares the CPU cores: split them (unless OMP_NUM_THREADS says otherwise)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    world_local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_local)))


# ---------------------------------------------------------------------------------------------------------
# models: LoRA, gradient checkpointing, unwrapping
# ---------------------------------------------------------------------------------------------------------
def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def unwrap(model) -> torch.nn.Module:
    """The plain HF model inside a DeepSpeed engine and/or a peft wrapper (LoRA layers stay injected)."""
    model = getattr(model, "module", model) if hasattr(model, "zero_optimization_stage") else model
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
    base = unwrap(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "config"):
        base.config.use_cache = False
    if is_peft(model):
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
        _scope_zero3_linear(engine, trainable=False)
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

    optimizer = None
    if o.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.adam_betas), eps=o.adam_eps)
    else:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": list(o.adam_betas), "eps": o.adam_eps,
                                                        "weight_decay": o.weight_decay}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      model_parameters=groups if optimizer is None else None,
                                      lr_scheduler=make_scheduler, config=cfg, dist_init_required=False)
    _scope_zero3_linear(engine, trainable=True)
    if world_size == 1 and rank_world()[1] == 1 and engine.zero_optimization_stage() == 0:
        # one process: DeepSpeed's gradient all-reduce (flatten every gradient, all_reduce through gloo's worker
        # thread, multiply by 1/1, copy back) is an exact identity that costs a few ms per optimizer step
        engine.enable_backward_allreduce = False
    engine.train()
    return engine


def _scope_zero3_linear(engine, trainable: bool) -> None:
    """Confine DeepSpeed's ZeRO-3 "memory efficient linear" to where it matters.

    Building a ZeRO-3 engine replaces `torch.nn.functional.linear` PROCESS-WIDE, for good, with a Python
    autograd.Function (it keeps only the partitioned weight for backward, so gathered weights are not held until
    backward). Every linear of every model in the process (ZeRO-0 engines, frozen models, generation, plain copies)
    then pays its Python overhead. Here torch's linear is put back, and the wrapper is switched on only for the
    grad-enabled forwards and the backward (activation-checkpointing recomputation must save the same tensors as
    the forward) of this trainable ZeRO-3 engine: the memory behaviour of ZeRO-3 training is unchanged,
    inference forwards save nothing for backward anyway, and both compute the same values."""
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as _Patcher
    except ImportError:  # pragma: no cover - deepspeed layout changed: leave DeepSpeed's behaviour
        return
    original = getattr(_Patcher, "linear_bk", None)
    if original is None or F.linear is not zero3_linear_wrap:
        return
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
# HF output
# ---------------------------------------------------------------------------------------------------------
def full_state_dict(engine_or_model, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's complete state dict as CPU tensors on rank 0 (ZeRO-3 parameters gathered; every rank must
    call this); None on other ranks."""
    module = engine_or_model.module if hasattr(engine_or_model, "zero_optimization_stage") else engine_or_model
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
    module = engine.module if hasattr(engine, "zero_optimization_stage") else engine
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
            unwrap(module).save_pretrained(out_dir, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    barrier()


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and containers (loss scalers, the ZeRO
    stage enum). They carry plain attributes only; allow-listing them keeps `weights_only=True` loading."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


@contextlib.contextmanager
def weights_only_torch_load():
    """Force `torch.load(..., weights_only=True)` for everything loaded inside (DeepSpeed passes False)."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = original


def _rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(st: dict) -> None:
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


class CheckpointManager:
    """Full training checkpoints of one stage run, committed to the store as `ckpt-<stage>/<key>.step-XXXXXXXX`.

    A checkpoint folder holds, per engine name, DeepSpeed's own checkpoint (module, optimizer, LR scheduler;
    ZeRO shards per rank) plus `state.json` (the caller's state: step, data position, history) and
    `rng/rank-N.json`. Writes go to a local staging folder (on a filesystem all ranks of a node share), rank 0
    commits it (manifest last) and prunes older checkpoints of the key beyond `keep`."""

    def __init__(self, store, stage: str, key: str, staging_dir: str | Path | None = None, keep: int = 2):
        self.store, self.stage, self.key, self.keep = store, stage, key, keep
        self.kind = f"ckpt-{stage}"
        self.staging = Path(staging_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"rlhf-ckpt-{stage}-{key}")

    def tag(self, step: int) -> str:
        return f"{self.key}.step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps with a committed (manifest present) checkpoint of this key, newest first."""
        prefix = f"{self.key}.step-"
        out = []
        for k in self.store.keys(self.kind):
            if k.startswith(prefix) and k[len(prefix):].isdigit() and self.store.read_manifest(self.kind, k):
                out.append(int(k[len(prefix):]))
        return sorted(out, reverse=True)

    def save(self, step: int, engines: dict[str, Any], state: dict) -> str | None:
        """Write and commit a checkpoint (ALL ranks call this). Returns the URI on rank 0."""
        rank, world = rank_world()
        folder = self.staging / f"step-{step:08d}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "rng").mkdir(parents=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(folder / name), tag="state", client_state={}, save_latest=False)
        (folder / "rng" / f"rank-{rank}.json").write_text(json.dumps(_rng_state()))
        uri = None
        if rank == 0:
            (folder / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world}, indent=1))
        barrier()
        if rank == 0:
            if self.store.read_manifest(self.kind, self.tag(step)) is not None:  # stale (e.g. failed to verify)
                self.store.delete(self.kind, self.tag(step))
            uri = self.store.put_dir(folder, self.kind, self.tag(step), metrics={"step": step})
            shutil.rmtree(folder, ignore_errors=True)
            for old in self.steps()[self.keep:]:
                self.store.delete(self.kind, self.tag(old))
            print(f"[{self.stage}] checkpoint committed: step {step} -> {uri}", flush=True)
        barrier()
        return uri

    def _latest_local(self) -> tuple[int, Path] | None:
        from ..errors import StoreError

        for step in self.steps():
            try:  # a remote get() re-hashes every file while downloading; a local folder is hashed here
                if self.store.is_local:
                    self.store.verify(self.kind, self.tag(step), deep=True)
                return step, self.store.get(self.kind, self.tag(step))
            except (StoreError, OSError) as e:
                print(f"[{self.stage}] skipping checkpoint step {step}: {e}", flush=True)
        return None

    def latest(self) -> tuple[int, Path] | None:
        """(step, local folder) of the newest complete checkpoint that verifies, or None. In a process group,
        rank 0 chooses (and downloads); the others fetch the same step."""
        rank, world = rank_world()
        found = self._latest_local() if rank == 0 else None
        if world == 1:
            return found
        step = broadcast_object(found[0] if found else None)
        if step is None:
            return None
        # rank 0 holds it already; the first rank of every other node downloads it, then its neighbours reuse it
        return step, Path(local_first(lambda: self.store.get(self.kind, self.tag(step))))

    def load(self, local_dir: str | Path, engines: dict[str, Any]) -> dict:
        """Restore every engine (module, optimizer, scheduler) and this rank's RNG states; return the state dict.
        Torch files are read with `weights_only=True` (nothing else is unpickled)."""
        local_dir = Path(local_dir)
        rank, world = rank_world()
        state = json.loads((local_dir / "state.json").read_text())
        if state.get("world_size") != world:
            raise ConfigError(f"checkpoint {local_dir.name} was written by {state.get('world_size')} processes, "
                              f"this run has {world}")
        for name, engine in engines.items():
            with weights_only_torch_load():
                path, _ = engine.load_checkpoint(str(local_dir / name), tag="state", load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint {local_dir / name}")
        _set_rng_state(json.loads((local_dir / "rng" / f"rank-{rank}.json").read_text()))
        return state


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Progress lines on stdout, an in-memory history, TensorBoard events under `out_dir/tensorboard` (rank 0)."""

    def __init__(self, out_dir: str | Path, rank: int, prefix: str = "", total_steps: int | None = None):
        self.out_dir, self.rank, self.prefix, self.total_steps = Path(out_dir), rank, prefix, total_steps
        self.history: list[dict] = []
        self._tb = None

    def _writer(self):
        if self._tb is None and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = False
        return self._tb or None

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.rank != 0:
            return
        tb = self._writer()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    tb.add_scalar(k, v, step)
            tb.flush()
        if echo:
            of = f"/{self.total_steps}" if self.total_steps else ""
            body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            print(f"[{self.prefix}] step {step}{of} {body}", flush=True)

    def restore(self, history: list[dict]) -> None:
        """Continue a resumed run: take over its history and replay it into TensorBoard."""
        for row in history:
            row = dict(row)
            self.log(row.pop("step"), row, echo=False)

    def write(self, path: str | Path, summary: dict, **extra) -> None:
        if self.rank != 0:
            return
        Path(path).write_text(json.dumps({"summary": summary, "history": self.history, **extra}, indent=1))

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def peak_memory_mb() -> float:
    """Peak memory of this process: accelerator memory if any, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# ---------------------------------------------------------------------------------------------------------
# deterministic sharded batches (the data-loader position is just the step)
# ---------------------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch_indices(perm: list[int], step_in_epoch: int, micro: int, mb: int, grad_accum: int, world: int,
                        rank: int) -> list[int]:
    """Rows of micro-batch `micro` of optimizer step `step_in_epoch` for `rank`: a global batch is
    mb * grad_accum * world consecutive rows of the epoch's permutation (drop-last)."""
    start = ((step_in_epoch * grad_accum + micro) * world + rank) * mb
    return perm[start:start + mb]


def eval_shards(n: int, mb: int, rank: int, world: int) -> Iterator[tuple[list[int], list[bool]]]:
    """Eval batches of this rank: rows rank::world in batches of `mb`. Every rank yields the same number of
    batches (ZeRO-3 forwards are collective); missing rows are padded with row 0 and flagged False."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world) if n else 0
    for start in range(0, per_rank, mb):
        idx = mine[start:start + mb]
        size = min(mb, per_rank - start)
        valid = [True] * len(idx) + [False] * (size - len(idx))
        yield idx + [0] * (size - len(idx)), valid


def pad_batch(seqs: list[list[int]], pad_id: int, labels: list[list[int]] | None = None,
              dev: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token lists -> input_ids, attention_mask (and labels padded with -100)."""
    ids, mask = pad_token_lists(seqs, pad_id, "right", min_width=1)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = pad_token_lists(labels, -100, "right", min_width=ids.shape[1])[0]
    if dev is not None:
        out = {k: v.to(dev) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------------------
# the shared step loop of SFT and the reward model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StageTask:
    """What a stage plugs into `train_stage`.

    `loss(engine, rows)` returns (loss tensor, {name: float}) for one micro-batch of training rows (indices);
    `evaluate(engine)` runs the full eval on all ranks and returns reduced metrics (same on every rank);
    `tokens(rows)` counts real tokens of a micro-batch (throughput)."""

    name: str
    tcfg: Any
    model: torch.nn.Module
    tokenizer: Any
    n_train: int
    loss: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Any], dict[str, float]]
    tokens: Callable[[list[int]], int]


def plan_steps(tcfg, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for `n_train` rows."""
    per_step = tcfg.micro_batch_size * tcfg.grad_accum * world
    spe = n_train // per_step
    if spe == 0:
        raise DataError(f"training split: {n_train} rows, but one optimizer step needs {per_step} "
                        f"(micro_batch_size x grad_accum x processes)")
    total = spe * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    return spe, total


def train_stage(spec, task: StageTask) -> dict:
    """Train `task` under DeepSpeed: resume from the latest checkpoint of `spec.key` if one verifies, else
    evaluate first; then the step loop with periodic eval and checkpoints; final eval; HF folder + metrics.json
    committed as the stage artifact on rank 0. Returns the flat summary."""
    t_start = time.time()
    tcfg = task.tcfg
    rank, world = rank_world()
    spe, total = plan_steps(tcfg, task.n_train, world)
    engine = build_engine(task.model, tcfg, total_steps=total, world_size=world)
    run_dir = Path(spec.run_dir or ".")
    out_dir = run_dir / "output"
    if rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    barrier()
    store = spec.open_store()
    ckpt = CheckpointManager(store, spec.stage, spec.key, staging_dir=run_dir / "checkpoint-staging",
                             keep=tcfg.keep_checkpoints)
    logger = MetricsLogger(out_dir, rank, prefix=task.name, total_steps=total)
    start_step, elapsed_before, eval_before = 0, 0.0, None
    found = ckpt.latest()
    if found:
        state = ckpt.load(found[1], {"model": engine})
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        eval_before = state["eval_before"]
        logger.restore(state["history"])
        if rank == 0:
            print(f"[{task.name}] resumed from checkpoint step {start_step} of {total}", flush=True)
    else:
        seed_everything(tcfg.seed + 7919 * rank)  # per-rank dropout streams, reproducible on resume
        engine.eval()
        eval_before = task.evaluate(engine)
        logger.log(0, {f"eval/{k}": v for k, v in eval_before.items()})

    tokens_done, train_time = 0, 0.0
    last = {}
    for step in range(start_step + 1, total + 1):
        epoch, pos = divmod(step - 1, spe)
        perm = epoch_permutation(task.n_train, tcfg.seed, epoch)
        engine.train()
        t0 = time.time()
        lr = engine.get_lr()[0] if engine.lr_scheduler is not None else tcfg.optim.lr
        sums: dict[str, float] = {}
        ntok = 0
        for micro in range(tcfg.grad_accum):
            rows = micro_batch_indices(perm, pos, micro, tcfg.micro_batch_size, tcfg.grad_accum, world, rank)
            loss, extra = task.loss(engine, rows)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.item(), **extra}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            ntok += task.tokens(rows)
        names = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in names] + [float(ntok)])
        dt = time.time() - t0
        train_time += dt
        tokens_done += int(reduced[-1])
        last = {k: v / (tcfg.grad_accum * world) for k, v in zip(names, reduced)}
        if step % tcfg.log_every == 0 or step == total:
            gn = engine.get_global_grad_norm()
            row = {**last, "lr": lr, "tokens_per_s": reduced[-1] / max(dt, 1e-9), "epoch": epoch}
            if gn is not None:
                row["grad_norm"] = float(gn)
            logger.log(step, row)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
            engine.eval()
            logger.log(step, {f"eval/{k}": v for k, v in task.evaluate(engine).items()})
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step != total:
            ckpt.save(step, {"model": engine}, {"eval_before": eval_before, "history": logger.history,
                                                "elapsed_s": elapsed_before + time.time() - t_start,
                                                "epoch": epoch, "position": pos + 1})
    engine.eval()
    eval_after = task.evaluate(engine)
    logger.log(total, {f"eval/{k}": v for k, v in eval_after.items()})
    save_hf(engine, task.tokenizer, out_dir, rank, keep_adapter=tcfg.lora.r > 0 and not tcfg.lora.merge)
    summary: dict[str, Any] = {"steps": total, "resumed_from_step": start_step, "world_size": world,
                               "wall_s": round(elapsed_before + time.time() - t_start, 3),
                               "train_tokens_per_s": round(tokens_done / train_time, 2) if train_time else 0.0,
                               "peak_mem_mb": round(peak_memory_mb(), 1)}
    if "loss" in last:
        summary["train_loss_final"] = last["loss"]
    for k, v in eval_before.items():
        summary[f"eval_{k}_before"] = v
    for k, v in eval_after.items():
        summary[f"eval_{k}"] = v
    logger.write(out_dir / "metrics.json", summary)
    logger.close()
    if rank == 0:
        from ..stages import commit_stage_output

        uri = commit_stage_output(spec, out_dir, summary)
        print(f"[{task.name}] committed {uri}", flush=True)
        for old in ckpt.steps():  # the artifact exists: its checkpoints are garbage now
            store.delete(ckpt.kind, ckpt.tag(old))
    barrier()
    return summary


# ---------------------------------------------------------------------------------------------------------
# stage job setup and examples (shared by SFT and the reward model)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    """What a stage job starts with: its config, rank/world, the store and the local data artifact folder."""

    cfg: Any
    rank: int
    world: int
    store: Any
    data_dir: Path


def stage_setup(spec) -> StageContext:
    """Threads, process group, config, store and the (downloaded, verified) data input of a stage job."""
    configure_threads()
    rank, world = init_distributed()
    cfg = spec.pipeline_config()
    store = spec.open_store()
    data_dir = local_first(lambda: store.get_uri(spec.inputs["data"]))
    return StageContext(cfg, rank, world, store, Path(data_dir))


def resolve_model_path(ref: str, ctx: StageContext) -> str:
    """A model reference (tiny:*, store URI, folder, hub name) as a local path, built/downloaded once per node."""
    from ..models import resolve_model

    return local_first(lambda: resolve_model(ref, ctx.cfg.models.tiny, ctx.store))


def load_examples(ctx: StageContext, phase: str, split: str, tokenizer, columns=("chosen",)) -> dict[str, list]:
    """Token ids of one phase/split: {"prompt_ids": [...], "<col>_ids": [...]} (rows whose columns are null are
    dropped). When `tokenizer` does not reproduce the artifact's ids (a reward model with another vocabulary), the
    texts are re-tokenized with it in the same format."""
    from ..data.artifact import load_phase

    ds = load_phase(ctx.data_dir, phase, split)
    cols = ds.select_columns(["prompt", "prompt_text", "prompt_ids"]
                             + [c for c in columns] + [f"{c}_ids" for c in columns]).to_dict()
    keep = [i for i in range(len(cols["prompt"])) if all(cols[f"{c}_ids"][i] is not None for c in columns)]
    cols = {k: [v[i] for i in keep] for k, v in cols.items()}
    if cols["prompt"] and not _ids_match(tokenizer, cols, columns):
        from ..data.formatting import format_prompt, tokenize_prompts, tokenize_responses

        if ctx.rank == 0:
            print(f"[{phase}] the model's tokenizer differs from the data's: re-tokenizing {split} texts", flush=True)
        texts = [format_prompt(tokenizer, p) for p in cols["prompt"]]
        cols["prompt_ids"] = tokenize_prompts(tokenizer, texts)
        for c in columns:
            cols[f"{c}_ids"] = tokenize_responses(tokenizer, cols[c], ctx.cfg.data.max_response_len)
    return {k: cols[k] for k in ["prompt_ids"] + [f"{c}_ids" for c in columns]}


def _ids_match(tokenizer, cols: dict, columns, n: int = 8) -> bool:
    from ..data.formatting import tokenize_prompts, tokenize_responses

    k = min(n, len(cols["prompt"]))
    if list(tokenize_prompts(tokenizer, cols["prompt_text"][:k])) != [list(x) for x in cols["prompt_ids"][:k]]:
        return False
    for c in columns:
        longest = max(len(x) for x in cols[f"{c}_ids"][:k])
        got = tokenize_responses(tokenizer, cols[c][:k], longest)
        if [list(x) for x in got] != [list(x) for x in cols[f"{c}_ids"][:k]]:
            return False
    return True


def join_truncate(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], int]:
    """prompt + response within `max_len` tokens, keeping the response whole when it fits (the prompt loses its
    beginning) -> (ids, number of prompt tokens kept)."""
    response = list(response)[:max_len]
    keep = max_len - len(response)
    prompt = list(prompt)[-keep:] if keep > 0 else []
    return prompt + response, len(prompt)
