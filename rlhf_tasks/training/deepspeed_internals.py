"""Every place we reach into DeepSpeed's (or torch's) private internals, in one module.

Each patch names what it relies on; `tests/test_deepspeed_internals.py` asserts those attributes exist in the
installed DeepSpeed, so an upgrade that removes one fails a test, not a user's run.
"""
from __future__ import annotations

import contextlib

import torch


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



def scope_zero3_linear(engine, trainable: bool) -> None:
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
