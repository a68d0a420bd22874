"""Checkpoints and artifacts that verify but are not what they claim: a pickle planted as a checkpoint or weights file
(its manifest rewritten to match, so every hash checks out) is refused and never executed, an unloadable
checkpoint is skipped for the previous one, and a committed run leaves no checkpoints behind."""
import hashlib
import pickle
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from rlhf_tasks import models
from rlhf_tasks.config import TinyModelConfig, TrainingConfig
from rlhf_tasks.stages import StageSpec
from rlhf_tasks.training.checkpoint import CheckpointManager
from rlhf_tasks.training.distributed import seed_everything
from rlhf_tasks.training.engine import build_engine
from rlhf_tasks.training.resumable import ResumableRun

MODEL_STATES = "model/state/mp_rank_00_model_states.pt"


class PlantedCode:
    """A pickle whose loading would run code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(store, kind: str, key: str, rel: str, data: bytes | None) -> None:
    """Replace (None: remove) one file of a committed artifact and rewrite its manifest to match, as someone with
    write access to the bucket could: the artifact still verifies."""
    base = f"{store.root}/{kind}/{key}"
    m = store.read_manifest(kind, key)
    m.files = [f for f in m.files if f["path"] != rel]
    if data is None:
        store.fs.rm(f"{base}/{rel}")
    else:
        store.fs.pipe_file(f"{base}/{rel}", data)
        m.files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    store.fs.pipe_file(f"{base}/manifest.json", m.to_json().encode())
    store.verify(kind, key, deep=True)


def pickled(obj, tmp_path: Path) -> bytes:
    f = tmp_path / f"{uuid.uuid4().hex}.pt"
    torch.save(obj, f)
    return f.read_bytes()


def _engine():
    seed_everything(0)
    path = models.ensure_tiny_model("llama", TinyModelConfig())
    return build_engine(models.load_causal_lm(str(path)), TrainingConfig(zero_stage=0, micro_batch_size=2),
                        total_steps=10)


def _train_and_checkpoint(cm, steps=(1, 2)) -> dict[int, dict]:
    eng = _engine()
    ids = torch.randint(5, 100, (2, 8))
    snap = {}
    for step in steps:
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        eng.step()
        cm.save(step, {"model": eng}, {"history": [{"step": step}]})
        snap[step] = {k: v.clone() for k, v in eng.module.state_dict().items()}
    return snap


def _assert_weights(engine, expected):
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_planted_pickle_checkpoint_is_refused_and_the_previous_one_loads(local_store, single_process_group,
                                                                          tmp_path, capsys):
    cm = CheckpointManager(local_store, "sft", "p" * 24, staging_dir=tmp_path / "staging", keep=3)
    snap = _train_and_checkpoint(cm)
    marker = tmp_path / "pwned"
    plant(local_store, cm.kind, cm.tag(2), MODEL_STATES, pickled({"module": PlantedCode(marker)}, tmp_path))
    fresh = _engine()
    for attempt in range(2):  # every retry resumes from step 1; none fails on the planted file
        step, state = cm.restore({"model": fresh})
        assert step == 1 and state["history"] == [{"step": 1}]
        _assert_weights(fresh, snap[1])
        assert fresh.global_steps == 1
    out = capsys.readouterr().out
    assert "WARNING: skipping checkpoint step 2: it verifies but cannot be loaded" in out
    assert MODEL_STATES in out
    assert not marker.exists()


def test_checkpoint_that_fails_inside_deepspeed_falls_back_to_the_previous(local_store, single_process_group,
                                                                          tmp_path, capsys):
    """Safe to open but wrong inside (no module weights): DeepSpeed fails half-way; the previous checkpoint's full
    load replaces whatever was restored."""
    cm = CheckpointManager(local_store, "sft", "q" * 24, staging_dir=tmp_path / "staging", keep=3)
    snap = _train_and_checkpoint(cm)
    plant(local_store, cm.kind, cm.tag(2), MODEL_STATES, pickled({"not the module": torch.zeros(1)}, tmp_path))
    fresh = _engine()
    step, _ = cm.restore({"model": fresh})
    assert step == 1
    _assert_weights(fresh, snap[1])
    assert "WARNING: skipping checkpoint step 2: it cannot be loaded" in capsys.readouterr().out


def test_only_checkpoint_unloadable_starts_fresh(local_store, single_process_group, tmp_path):
    cm = CheckpointManager(local_store, "sft", "r" * 24, staging_dir=tmp_path / "staging", keep=3)
    _train_and_checkpoint(cm, steps=(1,))
    marker = tmp_path / "pwned"
    plant(local_store, cm.kind, cm.tag(1), MODEL_STATES, pickled({"module": PlantedCode(marker)}, tmp_path))
    fresh = _engine()
    before = {k: v.clone() for k, v in fresh.module.state_dict().items()}
    assert cm.restore({"model": fresh}) is None
    _assert_weights(fresh, before)  # refused before any engine was touched
    assert not marker.exists()


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_planted_pickle_as_weights_is_refused(weights_file, local_store, tmp_path):
    """A model artifact whose weights file is a pickle with code (manifest rewritten to match) fails to load and
    the code never runs, whether it poses as safetensors or as a torch .bin."""
    src = models.ensure_tiny_model("llama", TinyModelConfig())
    uri = local_store.put_dir(src, "sft", "w" * 24)
    marker = tmp_path / "pwned"
    evil = pickled({"model.embed_tokens.weight": PlantedCode(marker)}, tmp_path)
    plant(local_store, "sft", "w" * 24, "model.safetensors", None if weights_file != "model.safetensors" else evil)
    if weights_file != "model.safetensors":
        plant(local_store, "sft", "w" * 24, weights_file, evil)
    folder = models.resolve_model(uri, store=local_store)
    # refused for what it is: not a safetensors header; a torch file that weights_only loading rejects
    refused, reason = ((SafetensorError, "deserializing header") if weights_file == "model.safetensors"
                       else (pickle.UnpicklingError, "Weights only load failed"))
    for load in (models.load_causal_lm, models.load_score_model):
        with pytest.raises(refused, match=reason):
            load(folder)
    assert not marker.exists()


def _ppo_spec(store, run_dir: Path) -> StageSpec:
    from rlhf_tasks.config import load_config

    key = uuid.uuid4().hex[:24]
    return StageSpec(stage="ppo", key=key, config=load_config(None, []).model_dump(mode="json", by_alias=True),
                     inputs={}, output_uri=store.uri("ppo", key), store=store.settings(), run_dir=str(run_dir))


def test_checkpoint_cadence(local_store, tmp_path):
    """Every `every` steps, never at the last one (the commit follows it), never with every=0."""
    spec = _ppo_spec(local_store, tmp_path / "r")
    due = {every: [s for s in range(1, 6) if ResumableRun(spec, "ppo", 5, keep=2, every=every,
                                                           store=local_store).checkpoint_due(s)]
           for every in (0, 1, 2, 5)}
    assert due == {0: [], 1: [1, 2, 3, 4], 2: [2, 4], 5: []}


def test_commit_deletes_the_runs_checkpoints(local_store, single_process_group, tmp_path):
    """ResumableRun is the one resume helper of SFT, the reward model and PPO: after the commit the stage artifact
    exists and none of its checkpoints remain (a silent storage leak at real model sizes otherwise)."""
    spec = _ppo_spec(local_store, tmp_path / "r")
    key = spec.key
    run = ResumableRun(spec, "ppo", total_steps=3, keep=2, store=local_store)
    eng = _engine()
    for step in (1, 2):
        run.logger.log(step, {"loss": 1.0 / step}, echo=False)
        run.checkpoint(step, {"actor": eng}, {"position": step})
    assert sorted(k for k in local_store.keys("ckpt-ppo") if k.startswith(key)) == [f"{key}.step-00000001",
                                                                                  f"{key}.step-00000002"]
    (run.out_dir / "actor").mkdir()
    (run.out_dir / "actor" / "config.json").write_text("{}")
    run.commit({"steps": 3})
    assert local_store.exists("ppo", key)
    assert [k for k in local_store.keys("ckpt-ppo") if k.startswith(key)] == []
