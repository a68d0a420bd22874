"""The dpo stage on tiny models (CPU, in-process world size 1, seconds): trained on the demo's preference pairs the
implicit-reward accuracy and margin on held-out pairs rise from where a policy equal to its reference stands (0.5
and 0), with each way of computing the reference; the artifact is a plain HF causal-LM folder."""
import uuid

import pytest

from _training_helpers import make_spec, metrics, put_tiny_sft, run_in_process, step_losses, tiny_cfg

COMMON = ["micro_batch_size=8", "max_seq_len=64", "optim.lr=2e-3", "optim.warmup_ratio=0.1", "max_steps=16",
          "epochs=2", "beta=0.1", "log_every=1"]


def _run(store, data_uri, tmp_path, monkeypatch, extra=()):
    cfg = tiny_cfg(["method=dpo", *[f"dpo.{o}" for o in COMMON], *extra])
    key = uuid.uuid4().hex[:24]
    spec = make_spec("dpo", cfg, store, data_uri, tmp_path / "run", key, {"sft": put_tiny_sft(store, cfg)})
    summary = run_in_process(spec, monkeypatch)
    assert store.exists("dpo", key)
    return summary, metrics(store, spec.output_uri), store.get_uri(spec.output_uri)


@pytest.mark.parametrize("reference,extra", [
    ("copy", []),
    ("copy", ["dpo.zero_stage=3", "dpo.precision=bf16"]),  # the frozen copy partitioned like the policy
    ("precomputed", []),
    ("adapter", ["dpo.lora.r=8", "dpo.optim.lr=1e-2", "dpo.zero_stage=2"]),
])
def test_dpo_learns_the_preferences(reference, extra, store, data_uri, tmp_path, monkeypatch):
    summary, m, folder = _run(store, data_uri, tmp_path, monkeypatch, [f"dpo.reference={reference}", *extra])
    # before training the policy is its reference: every implicit reward is 0, every pair a tie
    assert summary["eval_accuracy_before"] == pytest.approx(0.5)
    assert summary["eval_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_loss_before"] == pytest.approx(0.693147, abs=1e-5)  # -log sigmoid(0) = log 2
    assert summary["eval_accuracy"] > 0.7, summary
    assert summary["eval_margin"] > 0.0 and summary["eval_loss"] < summary["eval_loss_before"]
    assert summary["eval_reward_chosen"] > summary["eval_reward_rejected"]
    losses = step_losses(m)
    assert len(losses) == summary["steps"] == 16
    steps = [r for r in m["history"] if "loss" in r]
    assert {"accuracy", "margin", "logp_chosen", "logp_rejected", "reward_chosen"} <= set(steps[0])
    assert sum(r["accuracy"] for r in steps[-4:]) > sum(r["accuracy"] for r in steps[:4])
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(folder / "model.safetensors"))  # LoRA merged
    from rlhf_tasks.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder))
    ids = tok(" Human: Describe the cat. Assistant:", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


def test_ipo_and_conservative_dpo_train(store, data_uri, tmp_path, monkeypatch):
    """IPO's loss starts at (0 - 1/(2 beta))^2 = 25 with beta 0.1 and falls; conservative DPO (label smoothing)
    still learns the preference."""
    summary, _, _ = _run(store, data_uri, tmp_path, monkeypatch, ["dpo.loss=ipo", "dpo.optim.lr=1e-3"])
    assert summary["eval_loss_before"] == pytest.approx(25.0, abs=1e-3)
    assert summary["eval_loss"] < summary["eval_loss_before"] and summary["eval_accuracy"] > 0.6
    summary, _, _ = _run(store, data_uri, tmp_path, monkeypatch, ["dpo.label_smoothing=0.2"])
    assert summary["eval_accuracy"] > 0.6 and summary["eval_margin"] > 0


@pytest.mark.parametrize("overrides,needle", [
    (["dpo.reference=adapter"], "dpo.reference=adapter needs LoRA"),
    (["dpo.reference=adapter", "dpo.lora.r=4", "dpo.lora.only_optimize_lora=false"], "dpo.reference=adapter"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing (0.1) is unused with dpo.loss=ipo"),
])
def test_dpo_config_rules(overrides, needle):
    from rlhf_tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="--set") as ei:
        tiny_cfg(overrides)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_auto_reference_is_the_adapter_only_when_the_base_is_frozen():
    assert tiny_cfg([]).dpo.reference_mode == "copy"
    assert tiny_cfg(["dpo.lora.r=4"]).dpo.reference_mode == "adapter"
    assert tiny_cfg(["dpo.lora.r=4", "dpo.lora.only_optimize_lora=false"]).dpo.reference_mode == "copy"
