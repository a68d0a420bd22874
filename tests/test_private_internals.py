"""Everything we rely on in a library's private internals (DeepSpeed's, torch's, transformers') still exists in the
installed versions, nothing outside `training/private_internals.py` touches them, each patch takes effect on live
engines, and a missing piece or an unverified version gives a warning and DeepSpeed's
own path, never a silent change. An upgrade that removes something fails here, not in a user's run."""
import inspect
import logging
import re
from pathlib import Path

import pytest
import torch

from rlhf_tasks import models
from rlhf_tasks.config import TinyModelConfig, TrainingConfig
from rlhf_tasks.training import private_internals as internals
from rlhf_tasks.training.engine import build_engine


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(internals, "_warned", set())


def _tiny_lm():
    return models.load_causal_lm(str(models.ensure_tiny_model("llama", TinyModelConfig())))


def test_every_private_name_we_rely_on_resolves():
    assert internals.missing_internals() == []
    import deepspeed
    from packaging.version import Version

    lo, hi = (Version(v) for v in internals.VERIFIED_DEEPSPEED)
    assert lo <= Version(deepspeed.__version__) < hi, "new DeepSpeed: re-verify the patches, then widen the range"


def test_single_process_patches_are_live(single_process_group):
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb._rlhf_single_process is True
    eng = build_engine(_tiny_lm(), TrainingConfig(zero_stage=0, micro_batch_size=2), total_steps=2)
    assert internals.missing_attributes(eng, "skip_single_process_allreduce") == []
    assert eng.enable_backward_allreduce is False
    assert internals.missing_attributes(eng, "engine_hooks") == []
    handles = internals._engine_hook_handles(eng)
    assert len(handles) == 2 and all(internals.missing_attributes(h, "hooks_suspended") == [] for h in handles)
    # suspension takes the hooks out of the module's dictionaries and puts them back in order
    before = (list(eng.module._forward_pre_hooks), list(eng.module._forward_hooks))
    with internals.engine_hooks_suspended(eng):
        assert not any(h.id in eng.module._forward_pre_hooks or h.id in eng.module._forward_hooks for h in handles)
    assert (list(eng.module._forward_pre_hooks), list(eng.module._forward_hooks)) == before


@pytest.mark.parametrize("trainable", [True, False])
def test_zero3_internals_are_where_we_look(trainable, single_process_group):
    import torch.nn.functional as F
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    eng = build_engine(_tiny_lm(), TrainingConfig(zero_stage=3, micro_batch_size=2), total_steps=2,
                       trainable=trainable)
    assert internals.missing_attributes(InsertPostInitMethodToModuleSubClasses, "zero3_linear_scope") == []
    assert F.linear is InsertPostInitMethodToModuleSubClasses.linear_bk  # torch's linear is back, process-wide
    offload = internals._zero3_offload(eng)
    assert offload is not None and internals.missing_attributes(offload, "zero3_hooks") == []
    params = list(eng.module.parameters())
    assert all(internals.missing_attributes(p, "zero3_params") == [] for p in params) and internals.has_zero3_params(eng.module)
    swapped = [m for m in eng.module.modules() if isinstance(m._parameters, ZeROOrderedDict)]
    assert swapped
    with torch.no_grad(), internals.zero3_gathered_without_hooks(eng, eng.module) as gather_s:
        assert gather_s is not None and all(p.numel() > 0 for p in params)  # gathered: full weights
        assert not any(isinstance(m._parameters, ZeROOrderedDict) for m in swapped)
        assert not any(h.id in eng.module._forward_pre_hooks for h in internals._engine_hook_handles(eng))
    assert all(isinstance(m._parameters, ZeROOrderedDict) for m in swapped)
    assert all(p.numel() == 0 for p in params)  # partitioned again


def test_hybrid_engine_attributes_exist():
    """DeepSpeed's Hybrid Engine needs CUDA to build; its instance attributes are checked in its source."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

    assert "self._inference_containers =" in inspect.getsource(DeepSpeedHybridEngine.__init__)
    assert "self._config =" in inspect.getsource(DeepSpeedEngine.__init__)
    from deepspeed.runtime.config import get_hybrid_engine_config

    assert get_hybrid_engine_config({"hybrid_engine": {"inference_tp_size": 2}}).inference_tp_size == 2


def test_transformers_internals_read_the_live_values():
    """The static-cache flag and the attention kernel as transformers sets them on a real model (the tiny llama
    supports a static cache; `attn_implementation=eager` is what the config then records)."""
    from transformers import AutoModelForCausalLM

    model = _tiny_lm()
    assert internals.supports_static_cache(model) is True
    assert internals.attention_implementation(model.config) == model.config._attn_implementation
    assert internals.attention_implementation(model.config) in ("sdpa", "eager")
    eager = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    assert internals.attention_implementation(eager.config) == "eager"
    assert internals.supports_static_cache(torch.nn.Linear(2, 2)) is False  # not a transformers model


def test_no_private_name_is_read_outside_the_one_module():
    """Each private attribute named in the inventory (a `_`-prefixed part of a `RELIES_ON` name, or an instance
    attribute of `ENGINE_ATTRIBUTES`) is read in no other module of the package: as `obj.<name>` or as a string
    (getattr), an object's own `self.<name>` aside."""
    import rlhf_tasks

    private = {part for names in internals.RELIES_ON.values() for name in names for part in name.split(".")
               if part.startswith("_") and not part.startswith("__")}
    private |= {a for attrs in internals.ENGINE_ATTRIBUTES.values() for a in attrs if a.startswith("_")}
    assert {"_can_compile_fullgraph", "_attn_implementation", "_inference_containers"} <= private
    package = Path(rlhf_tasks.__file__).parent
    reads = re.compile(r"(?<!self)(?<!cls)\.({0})\b|['\"]({0})['\"]".format("|".join(sorted(private))))
    found = [f"{path.relative_to(package)}: {m.group(0)}" for path in sorted(package.rglob("*.py"))
             if path.name != "private_internals.py" for m in reads.finditer(path.read_text())]
    assert found == []


def test_missing_attribute_warns_and_takes_the_unpatched_path(fresh_warnings, caplog):
    class OldEngine:  # an engine of a DeepSpeed without the attributes we patch
        module_forward_pre_hook = None

    eng = OldEngine()
    with caplog.at_level(logging.WARNING, logger=internals.__name__):
        internals.skip_single_process_allreduce(eng)
        with internals.engine_hooks_suspended(eng):
            pass
    assert not hasattr(eng, "enable_backward_allreduce")
    text = caplog.text
    assert "lacks enable_backward_allreduce" in text and "lacks module_forward_post_hook" in text
    with pytest.raises(internals.DeepSpeedInternalsError, match="_inference_containers"):
        internals.hybrid_engine_injected(eng)


def test_unverified_deepspeed_version_uses_the_unpatched_path(fresh_warnings, single_process_group, monkeypatch,
                                                              caplog):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with caplog.at_level(logging.WARNING, logger=internals.__name__):
        eng = build_engine(_tiny_lm(), TrainingConfig(zero_stage=0, micro_batch_size=2), total_steps=2)
    assert eng.enable_backward_allreduce is True
    assert "deepspeed 0.99.0 is outside the versions" in caplog.text


def test_deepspeed_checkpoint_loads_refuse_pickled_code(tmp_path):
    """DeepSpeed's own checkpoint reader (weights_only=False) is forced to weights_only=True inside the scope: a
    pickle whose __reduce__ would run code is refused and never executed; outside the scope torch.load is back."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "x": Evil()}, f)
    with internals.weights_only_torch_load():
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            TorchCheckpointEngine().load(str(f))
        ok = tmp_path / "ok.pt"
        torch.save({"module": {"w": torch.ones(2)}, "step": 3}, ok)
        assert torch.equal(TorchCheckpointEngine().load(str(ok))["module"]["w"], torch.ones(2))
    assert not marker.exists()
    assert torch.load(f, weights_only=False) and marker.exists()  # the unscoped default really would run it


def test_op_build_pending_tells_a_compiled_op_from_one_to_compile(tmp_path, monkeypatch):
    """Against DeepSpeed's real builder and torch's extension folder: an empty TORCH_EXTENSIONS_DIR means the op
    would compile (its folder is returned); a compiled module there (or DeepSpeed's prebuilt one) means no build."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = internals.op_build_pending(builder)
    assert folder == str(tmp_path / "ext" / builder.name)
    (Path(folder) / f"{builder.name}.so").write_bytes(b"")
    assert internals.op_build_pending(builder) is None


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build lock left by a killed job (older than a compile takes) would make every later load of the op wait
    forever in torch's FileBaton: the announcement before a load removes it and says so; a fresh one (a live
    build in another job) is left alone. DeepSpeed's real builder, torch's real extension folder."""
    import os
    import time

    from deepspeed.accelerator import get_accelerator

    from rlhf_tasks.training import op_builds

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = Path(internals.op_build_lock(builder))
    assert lock == tmp_path / "ext" / builder.name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(b"")  # fresh: a build running elsewhere
    lines: list[str] = []
    op_builds.announce_pending_builds(["ShareMemCommBuilder"], print_line=lines.append)
    assert lock.exists() and not any("stale build lock" in line for line in lines)
    old = time.time() - op_builds.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    op_builds.announce_pending_builds(["ShareMemCommBuilder"], print_line=lines.append)
    assert not lock.exists()
    assert any(line.startswith(op_builds.BUILD_PREFIX) and "stale build lock" in line for line in lines)
