"""The step-3 stage job (PPO, and GRPO without a critic): artifact layout (actor/, ema/, metrics.json with per-step
history), and a run SIGKILLed after a checkpoint that resumes and finishes with the same number of steps and the
same metrics as an uninterrupted run (actor, critic, optimizers, schedulers, EMA, KL controller, prompt position,
RNG)."""
import json
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from _training_helpers import launch_and_kill, make_data_artifact, tiny_cfg
from rlhf_tasks.config import ExecutionConfig
from rlhf_tasks.launch import run_stage
from rlhf_tasks.models import load_score_model, resolve_model
from rlhf_tasks.stages import StageSpec

pytestmark = pytest.mark.slow
TIMING = ("time/", "gen/", "samples_per_s")


@pytest.fixture(scope="module")
def inputs(store):
    """data (demo), sft (the tiny actor as is) and reward (the tiny model with a fresh value head) artifacts."""
    cfg = tiny_cfg()
    data = make_data_artifact(store, cfg, n_rows=300)
    actor = resolve_model(cfg.models.actor, cfg.models.tiny)
    sft = store.put_dir(actor, "sft", "test-ppo-sft")
    tmp = Path(tempfile.mkdtemp(prefix="rm-"))
    load_score_model(actor).save_pretrained(tmp)
    from rlhf_tasks.models import load_tokenizer

    load_tokenizer(actor).save_pretrained(tmp)
    return {"data": data, "sft": sft, "reward": store.put_dir(tmp, "reward", "test-ppo-rm")}


def _cfg(steps=6):
    return tiny_cfg([f"ppo.total_steps={steps}", "ppo.checkpoint_every=2", "ppo.prompt_batch_size=8",
                     "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8", "ppo.ema_decay=0.9",
                     "ppo.adaptive_kl=true", "ppo.kl_target=0.05", "ppo.kl_horizon=100"])


def _spec(cfg, store, inputs, run_dir: Path, stage: str = "ppo") -> StageSpec:
    key = uuid.uuid4().hex[:24]
    return StageSpec(stage=stage, key=key, config=cfg.model_dump(mode="json", by_alias=True), inputs=inputs,
                     output_uri=store.uri(stage, key), store=store.settings(), run_dir=str(run_dir))


def _metrics(store, uri):
    return json.loads((store.get_uri(uri) / "metrics.json").read_text())


def kill_and_resume(store, cfg, inputs, tmp_path, stage: str) -> tuple[dict, dict]:
    """An uninterrupted run and a run SIGKILLed after its step-2 checkpoint (during step 3) then resumed: both
    finish with 6 steps and the same per-step metrics (timings aside). -> (full, resumed) metrics.json"""
    execution = ExecutionConfig(device="cpu", timeout_s=600)
    full_spec = _spec(cfg, store, inputs, tmp_path / "full", stage)
    full = _metrics(store, run_stage(full_spec, execution, log=lambda line: None))
    art = store.get_uri(full_spec.output_uri)
    assert (art / "actor" / "config.json").exists() and (art / "ema" / "config.json").exists()
    assert full["summary"]["steps"] == 6 and full["summary"]["resumed_from_step"] == 0

    spec = _spec(cfg, store, inputs, tmp_path / "crash", stage)
    launch_and_kill(spec, execution, kill_after_step=3)
    assert not store.exists(stage, spec.key)
    assert [k for k in store.keys(f"ckpt-{stage}") if k.startswith(spec.key)] == [f"{spec.key}.step-00000002"]
    run_stage(spec, execution, log=lambda line: None)
    resumed = _metrics(store, spec.output_uri)
    assert resumed["summary"]["resumed_from_step"] == 2
    assert [k for k in store.keys(f"ckpt-{stage}") if k.startswith(spec.key)] == []  # deleted after the commit
    assert resumed["summary"]["steps"] == 6
    a = {r["step"]: r for r in full["history"]}
    b = {r["step"]: r for r in resumed["history"]}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s].keys() == b[s].keys()
        for k, v in a[s].items():
            if not k.startswith(TIMING):
                assert b[s][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), f"step {s} {k}"
    return full, resumed


def test_ppo_stage_kill_and_resume(store, inputs, tmp_path):
    kill_and_resume(store, _cfg(), inputs, tmp_path, "ppo")


def test_grpo_stage_with_a_function_reward_kill_and_resume(store, inputs, tmp_path):
    """GRPO scored by the demo's gold function alone: no reward-model input, no critic in the checkpoints (actor,
    EMA, trainer state), and the same resume guarantee as PPO."""
    cfg = tiny_cfg(["ppo.total_steps=6", "ppo.checkpoint_every=2", "ppo.prompt_batch_size=4",
                    "ppo.samples_per_prompt=4", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8",
                    "ppo.ema_decay=0.9", "ppo.reward=fn", "ppo.reward_fn=rlhf_tasks.data.demo:gold_score",
                    "ppo.kl_in=loss"])
    full, _ = kill_and_resume(store, cfg, {"data": inputs["data"], "sft": inputs["sft"]}, tmp_path, "grpo")
    step = full["history"][0]
    assert "policy/kl_loss" in step and "reward/group_std" in step
    assert not any(k.startswith("value/") for k in step)
    assert full["summary"]["reward_fn_mean_final"] == pytest.approx(full["summary"]["gold_mean_final"])


def test_ppo_stage_two_processes_zero3(store, inputs, tmp_path):
    """World size 2 under torchrun with ZeRO-3 actor and critic: the job runs all steps, metrics are averaged over
    ranks, and the consolidated actor loads as a plain HF model."""
    from rlhf_tasks.models import load_causal_lm

    cfg = tiny_cfg(["ppo.total_steps=3", "ppo.prompt_batch_size=4", "ppo.mini_batch_size=4", "ppo.max_new_tokens=8",
                    "ppo.actor.zero_stage=3", "ppo.critic.zero_stage=3", "execution.num_procs=2"])
    spec = _spec(cfg, store, inputs, tmp_path / "ws2")
    uri = run_stage(spec, ExecutionConfig(device="cpu", timeout_s=600, num_procs=2), log=lambda line: None)
    m = _metrics(store, uri)
    assert m["summary"]["steps"] == 3 and m["summary"]["world_size"] == 2
    assert [r["step"] for r in m["history"]] == [1, 2, 3]
    trained = load_causal_lm(str(store.get_uri(uri) / "actor")).state_dict()
    start = load_causal_lm(str(store.get_uri(inputs["sft"]))).state_dict()
    assert trained.keys() == start.keys()  # ZeRO-3 shards consolidated into the full model
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the actor was trained
