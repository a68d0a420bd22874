"""Model helpers: tiny models round-trip through from_pretrained; scoring reads the last real token by mask."""
import json

import torch

from rlhf_tasks import models
from rlhf_tasks.config import TinyModelConfig

SHAPE = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


def test_tiny_models_round_trip():
    for arch in ("llama", "opt"):
        path = models.ensure_tiny_model(arch, SHAPE)
        assert models.ensure_tiny_model(arch, SHAPE) == path  # built once, then reused
        tok = models.load_tokenizer(str(path))
        assert tok.pad_token_id != tok.eos_token_id
        model = models.load_causal_lm(str(path))
        assert model.config.model_type == arch
        ids = tok(["Describe the garden."], return_tensors="pt")
        assert models.lm_logits(model, ids.input_ids, ids.attention_mask).shape[-1] == len(tok)


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    a = models.ensure_tiny_model("llama", SHAPE)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    b = models.ensure_tiny_model("llama", SHAPE)
    assert a != b
    sa = models.load_causal_lm(str(a)).state_dict()
    sb = models.load_causal_lm(str(b)).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_build_writes_nothing_to_stderr(tmp_path, monkeypatch, capfd):
    """A cold cache builds the tiny model inside the pre-launch check, whose error output must stay one line."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    hf_logging.enable_progress_bar()  # as in a plain `rlhf` process (the tests' environment may disable bars)
    capfd.readouterr()
    models.ensure_tiny_model("opt", SHAPE)
    assert capfd.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is restored


def test_model_identity_forms(tmp_path):
    assert models.model_identity("tiny:llama", SHAPE)["tiny"] == "llama"
    sha = "0123456789abcdef0123456789abcdef01234567"  # a pinned commit is used as given (tests/test_stage_keys.py)
    assert models.model_identity("facebook/opt-1.3b", revision=sha) == {"hub": "facebook/opt-1.3b", "revision": sha}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    first = models.model_identity(str(d))
    (d / "config.json").write_text('{"a": 1}')
    assert models.model_identity(str(d)) != first  # local folders are identified by content


def test_sequence_scores_use_mask_not_pad_id():
    """Left or right padding, and a pad id equal to EOS, give the same score for the same sequence."""
    path = models.ensure_tiny_model("llama", SHAPE)
    rm = models.load_score_model(str(path)).eval()
    seq = torch.tensor([[5, 6, 7, 2]])  # ends with a token we also use as "pad" below
    full = models.sequence_scores(rm, seq, torch.ones_like(seq))
    right = torch.tensor([[5, 6, 7, 2, 2, 2]])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[2, 2, 5, 6, 7, 2]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(models.sequence_scores(rm, right, right_mask), full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(models.sequence_scores(rm, left, left_mask), full, atol=1e-5, rtol=1e-4)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert models.last_token_index(mask).tolist() == [1, 3, 3]


def test_score_model_head_saved_with_model(tmp_path):
    path = models.ensure_tiny_model("opt", SHAPE)
    rm = models.load_score_model(str(path))
    head = models.score_head(rm)
    assert head is not None and head.out_features == 1
    std = head.weight.std().item()
    assert 0.5 / (SHAPE.hidden_size + 1) ** 0.5 < std < 2.0 / (SHAPE.hidden_size + 1) ** 0.5
    rm.save_pretrained(tmp_path / "rm")
    again = models.load_score_model(str(tmp_path / "rm"))
    torch.testing.assert_close(models.score_head(again).weight, head.weight)


def test_set_dropout_turns_everything_off():
    path = models.ensure_tiny_model("opt", SHAPE)
    m = models.load_causal_lm(str(path), dropout=0.0)
    assert all(x.p == 0.0 for x in m.modules() if isinstance(x, torch.nn.Dropout))
    assert m.config.dropout == 0.0


def test_remote_code_in_a_model_folder_is_never_run(tmp_path):
    """A folder whose config asks for custom code (`auto_map`) is refused by every loader; the code never runs."""
    import pytest

    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "code-ran"
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil-net", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil",
                     "AutoModelForSequenceClassification": "modeling_evil.Evil",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_evil.EvilTokenizer", None]}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (d / name).write_text(code)
    for load in (models.load_causal_lm, models.load_score_model, models.load_tokenizer):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load(str(d))
    assert not marker.exists()
