"""SFT and reward-model stages on tiny models (CPU, in-process world size 1), and the training core's pieces."""
import uuid

import pytest
import torch

from _training_helpers import make_spec, metrics, run_in_process, step_losses, tiny_cfg

COMMON = ["micro_batch_size=8", "max_seq_len=64", "optim.lr=2e-3", "optim.warmup_ratio=0.1", "log_every=1"]


def _cfg(stage: str, extra=()):
    return tiny_cfg([f"{stage}.{o}" for o in COMMON] + list(extra))


def _run(stage, cfg, store, data_uri, tmp_path, monkeypatch):
    key = uuid.uuid4().hex[:24]
    spec = make_spec(stage, cfg, store, data_uri, tmp_path / "run", key)
    summary = run_in_process(spec, monkeypatch)
    assert store.exists(stage, key)
    return summary, spec.output_uri


def test_sft_zero0_loss_decreases_and_output_loads(store, data_uri, tmp_path, monkeypatch):
    cfg = _cfg("sft", ["sft.max_steps=12", "sft.epochs=3"])
    summary, uri = _run("sft", cfg, store, data_uri, tmp_path, monkeypatch)
    m = metrics(store, uri)
    losses = step_losses(m)
    assert len(losses) == 12 and summary["steps"] == 12
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])
    assert summary["eval_ppl"] < summary["eval_ppl_before"]
    assert m["summary"] == summary and m["history"][0]["step"] == 0
    assert summary["train_tokens_per_s"] > 0 and summary["peak_mem_mb"] > 0 and summary["wall_s"] > 0
    assert all("lr" in r and "tokens_per_s" in r for r in m["history"] if "loss" in r)
    folder = store.get_uri(uri)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(" Human: Describe the cat. Assistant:", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


def test_sft_lora_zero2_with_gradient_checkpointing(store, data_uri, tmp_path, monkeypatch):
    cfg = _cfg("sft", ["sft.max_steps=8", "sft.zero_stage=2", "sft.lora.r=8", "sft.lora.alpha=16",
                       "sft.gradient_checkpointing=true", "sft.optim.lr=1e-2", "sft.lora.merge=false"])
    summary, uri = _run("sft", cfg, store, data_uri, tmp_path, monkeypatch)
    losses = list(step_losses(metrics(store, uri)).values())
    assert losses[-1] < losses[0] and summary["eval_ppl"] < summary["eval_ppl_before"]
    folder = store.get_uri(uri)
    from safetensors.torch import load_file

    keys = load_file(folder / "model.safetensors").keys()
    assert not any("lora" in k for k in keys), "LoRA must be merged into the saved model"
    assert (folder / "adapter" / "adapter_config.json").exists()  # kept because lora.merge=false


def test_reward_zero0_learns_preferences(store, data_uri, tmp_path, monkeypatch):
    cfg = _cfg("reward", ["reward.max_steps=40", "reward.epochs=5"])
    summary, uri = _run("reward", cfg, store, data_uri, tmp_path, monkeypatch)
    assert summary["eval_accuracy"] >= 0.75, summary
    assert summary["eval_margin"] > summary["eval_margin_before"]
    assert summary["eval_loss"] < summary["eval_loss_before"]
    # the head is saved with the model: one call loads it, scores match the eval direction
    from rlhf_tasks.models import load_score_model, score_head

    model = load_score_model(str(store.get_uri(uri)))
    assert score_head(model) is not None and model.config.num_labels == 1


def test_reward_zero3_lora_bf16_single_process(store, data_uri, tmp_path, monkeypatch):
    cfg = _cfg("reward", ["reward.max_steps=10", "reward.zero_stage=3", "reward.lora.r=4", "reward.precision=bf16",
                          "reward.optim.lr=5e-3"])
    summary, uri = _run("reward", cfg, store, data_uri, tmp_path, monkeypatch)
    assert summary["eval_loss"] < summary["eval_loss_before"]
    from rlhf_tasks.models import load_score_model

    model = load_score_model(str(store.get_uri(uri)))  # a consolidated, merged, plain HF folder
    assert all(p.numel() > 0 for p in model.parameters())


def _reward_zero3_checkpointing_cfg():
    return _cfg("reward", ["reward.max_steps=12", "reward.epochs=3", "reward.zero_stage=3",
                           "reward.gradient_checkpointing=true", "reward.optim.lr=5e-3"])


def _assert_reward_learned(summary, m):
    losses = list(step_losses(m).values())
    assert len(losses) == summary["steps"] == 12
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert summary["eval_loss"] < summary["eval_loss_before"]


def test_reward_zero3_gradient_checkpointing_single_process(store, data_uri, tmp_path, monkeypatch):
    """The reward forward goes through the engine, so ZeRO-3's scoped linear is on for the forward AND for the
    checkpointing recomputation in backward (going around the engine raised CheckpointError: "Recomputed values
    ... have different metadata")."""
    summary, uri = _run("reward", _reward_zero3_checkpointing_cfg(), store, data_uri, tmp_path, monkeypatch)
    _assert_reward_learned(summary, metrics(store, uri))


@pytest.mark.slow
def test_reward_zero3_gradient_checkpointing_two_processes(store, data_uri, tmp_path):
    from rlhf_tasks.config import ExecutionConfig
    from rlhf_tasks.launch import run_stage

    key = uuid.uuid4().hex[:24]
    spec = make_spec("reward", _reward_zero3_checkpointing_cfg(), store, data_uri, tmp_path / "run", key)
    uri = run_stage(spec, ExecutionConfig(device="cpu", num_procs=2, timeout_s=600), log=lambda line: None)
    m = metrics(store, uri)
    assert m["summary"]["world_size"] == 2
    _assert_reward_learned(m["summary"], m)


# ---- core pieces ------------------------------------------------------------------------------------------
def test_batches_are_disjoint_and_deterministic():
    from rlhf_tasks.training.batches import epoch_permutation, micro_batch_indices

    perm = epoch_permutation(100, 7, 0)
    assert perm == epoch_permutation(100, 7, 0) and perm != epoch_permutation(100, 7, 1)
    seen = [i for step in range(3) for micro in range(2) for rank in range(2)
            for i in micro_batch_indices(perm, step, micro, 4, 2, 2, rank)]
    assert len(seen) == len(set(seen)) == 48


def test_eval_shards_cover_every_row_once_with_equal_batch_counts():
    from rlhf_tasks.training.batches import eval_shards

    for n, mb, world in [(10, 3, 2), (7, 4, 3), (1, 8, 2), (16, 4, 4)]:
        per_rank = [list(eval_shards(n, mb, r, world)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        rows = sorted(i for b in per_rank for idx, valid in b for i, v in zip(idx, valid) if v)
        assert rows == list(range(n))


def test_join_truncate_keeps_response():
    from rlhf_tasks.training.batches import join_truncate

    assert join_truncate([1, 2, 3], [4, 5], 10) == ([1, 2, 3, 4, 5], 3)
    assert join_truncate([1, 2, 3], [4, 5], 4) == ([2, 3, 4, 5], 2)
    assert join_truncate([1, 2, 3], [4, 5, 6, 7, 8], 4) == ([4, 5, 6, 7], 0)


def test_deepspeed_config_generation():
    from rlhf_tasks.config import TrainingConfig
    from rlhf_tasks.training.engine import deepspeed_config

    c = deepspeed_config(TrainingConfig(zero_stage=3, offload=True, precision="bf16", micro_batch_size=2,
                                        grad_accum=4), world_size=2)
    assert c["train_batch_size"] == 16 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert c["gradient_clipping"] == 1.0
    frozen = deepspeed_config(TrainingConfig(zero_stage=2), world_size=1, trainable=False)
    assert frozen["zero_optimization"]["stage"] == 0 and "gradient_clipping" not in frozen


def test_sft_labels_mask_prompt_by_default():
    from rlhf_tasks.training.sft import build_sequences

    seqs, labels = build_sequences([[1, 2, 3]], [[4, 5, 9]], 16, train_on_prompt=False)
    assert seqs == [[1, 2, 3, 4, 5, 9]] and labels == [[-100, -100, -100, 4, 5, 9]]
    _, labels = build_sequences([[1, 2, 3]], [[4, 5, 9]], 16, train_on_prompt=True)
    assert labels == [[1, 2, 3, 4, 5, 9]]


def test_pairwise_loss_values():
    from rlhf_tasks.training.reward import pairwise_loss

    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (-torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.tensor(2.0))) / 2
    assert torch.allclose(pairwise_loss(rc, rr), expected)


def test_checkpoint_manager_roundtrip_prune_and_fallback(any_store, single_process_group, tmp_path):
    """Save three checkpoints (keep 2), corrupt the newest: latest() falls back to the previous one, and load
    restores its weights, optimizer step count and RNG stream. Runs on a local folder and on S3 (moto)."""
    from rlhf_tasks import models
    from rlhf_tasks.config import TinyModelConfig, TrainingConfig
    from rlhf_tasks.training.checkpoint import CheckpointManager
    from rlhf_tasks.training.distributed import seed_everything
    from rlhf_tasks.training.engine import build_engine

    path = models.ensure_tiny_model("llama", TinyModelConfig())
    tcfg = TrainingConfig(zero_stage=2, micro_batch_size=2)

    def engine():
        seed_everything(0)
        return build_engine(models.load_causal_lm(str(path)), tcfg, total_steps=10)

    eng = engine()
    ids = torch.randint(5, 100, (2, 8))
    cm = CheckpointManager(any_store, "sft", "k" * 24, staging_dir=tmp_path / "staging", keep=2)
    snap = {}
    for step in (1, 2, 3):
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        eng.step()
        cm.save(step, {"model": eng}, {"history": [{"step": step}]})
        snap[step] = ({k: v.clone() for k, v in eng.module.state_dict().items()}, torch.rand(3))
    assert cm.steps() == [3, 2]
    newest = f"{any_store.root}/ckpt-sft/{cm.tag(3)}/state.json"
    text = any_store.fs.cat_file(newest)
    any_store.fs.pipe_file(newest, text.replace(b'"step": 3', b'"step": 9'))  # same size, wrong sha256
    step, folder = cm.latest()
    assert step == 2
    fresh = engine()
    state = cm.load(folder, {"model": fresh})
    assert state["step"] == 2 and state["history"] == [{"step": 2}] and state["world_size"] == 1
    for k, v in fresh.module.state_dict().items():
        assert torch.equal(v, snap[2][0][k]), k
    assert torch.equal(torch.rand(3), snap[2][1])  # the RNG continues exactly where step 2 left it
    assert fresh.global_steps == 2 and fresh.lr_scheduler.last_epoch == 2


@pytest.mark.parametrize("zero", [0, 3])
def test_frozen_engine_for_reference_models(zero, single_process_group):
    """trainable=False: no optimizer, frozen, eval mode; forwards work at ZeRO-0 and ZeRO-3 (PPO's ref/reward)."""
    from rlhf_tasks import models
    from rlhf_tasks.config import TinyModelConfig, TrainingConfig
    from rlhf_tasks.training.engine import build_engine, plain_hf_model

    path = models.ensure_tiny_model("llama", TinyModelConfig())
    eng = build_engine(models.load_score_model(str(path)), TrainingConfig(zero_stage=zero), trainable=False,
                       extra_config={"steps_per_print": 7})
    assert eng.steps_per_print() == 7
    assert getattr(eng, "basic_optimizer", None) is None and eng.lr_scheduler is None and not eng.module.training
    assert not any(p.requires_grad for p in eng.module.parameters())
    ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        scores = models.sequence_scores(plain_hf_model(eng), ids, torch.ones_like(ids))
    assert scores.shape == (2,)


def test_reward_encoder_backbone_with_its_own_tokenizer(store, data_uri, tmp_path, monkeypatch):
    """A BERT-like classifier as the reward model, with a vocabulary unlike the data's: texts are re-tokenized
    with the reward model's tokenizer and the encoder's pooled head gives the score."""
    from transformers import BertConfig, BertModel

    from rlhf_tasks.data.demo import tokenizer_corpus
    from rlhf_tasks.models import train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), vocab_size=300)
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, pad_token_id=tok.pad_token_id))
    folder = tmp_path / "tiny-bert"
    enc.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = _cfg("reward", ["reward.max_steps=30", "reward.epochs=5", f"models.reward={folder}"])
    summary, uri = _run("reward", cfg, store, data_uri, tmp_path, monkeypatch)
    assert summary["eval_loss"] < summary["eval_loss_before"] and summary["eval_accuracy"] > 0.6
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(store.get_uri(uri)).config.model_type == "bert"


@pytest.mark.slow
def test_deepspeed_adam_optional(single_process_group):
    """optim.optimizer=deepspeed_adam: DeepSpeed builds its own Adam (JIT-compiled once, ~50-130 s on 2 cores)."""
    from rlhf_tasks import models
    from rlhf_tasks.config import TinyModelConfig, TrainingConfig
    from rlhf_tasks.training.engine import build_engine

    path = models.ensure_tiny_model("llama", TinyModelConfig())
    tcfg = TrainingConfig(zero_stage=2, micro_batch_size=2, optim={"optimizer": "deepspeed_adam", "lr": 1e-2})
    eng = build_engine(models.load_causal_lm(str(path)), tcfg, total_steps=5)
    assert not isinstance(eng.basic_optimizer, torch.optim.AdamW)
    ids = torch.randint(5, 100, (2, 8))
    losses = []
    for _ in range(5):
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
