"""Step 0, the data stage: load -> map -> validate -> tokenize -> blend/split -> write the `data` artifact.

Everything is checked in memory before the first file is written, and the artifact is committed to the store only
after it is complete, so bad data never leaves anything in the store.

Entry points:
  run(spec)                  the stage job (`python -m rlhf_tasks.stage_main spec.json`)
  prepare(cfg, out_dir)      the same in-process, into a local folder; returns the flat summary
  validate_sources(cfg)      the checks alone, for the CLI/flow before anything is launched
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from ..config import PipelineConfig
from ..errors import DataError
from . import artifact
from .blend import PHASES, SPLITS, Blend, Pool, blend, parse_split
from .formatting import clip_response, format_prompt, has_chat_template, tokenize_prompts, tokenize_responses
from .schemas import resolve_mapping
from .sources import load_source, resolve_sources
from .validate import BadRows, Example, drop_duplicates, drop_long_prompts, map_rows


def tokenizer_ref(cfg: PipelineConfig) -> str:
    return cfg.models.tokenizer or cfg.models.actor


def load_data_tokenizer(cfg: PipelineConfig):
    """The tokenizer the data is encoded with: `models.tokenizer`, else the actor's."""
    from .. import models

    path = models.resolve_model(tokenizer_ref(cfg), cfg.models.tiny, revision=cfg.models.revision)
    return models.load_tokenizer(path, padding_side="right")


def _log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


# ---- tokenization ---------------------------------------------------------------------------------------
def tokenize(examples: list[Example], tok, max_response_len: int, memo: dict) -> int:
    """Fill prompt_text/prompt_ids/chosen_ids/rejected_ids; returns how many responses were truncated."""
    new = sorted({ex.prompt for ex in examples} - memo.keys())
    texts = [format_prompt(tok, p) for p in new]
    for p, text, ids in zip(new, texts, tokenize_prompts(tok, texts)):
        memo[p] = (text, ids)
    truncated = 0
    for role in ("chosen", "rejected"):
        todo = [ex for ex in examples if getattr(ex, role) is not None]
        full = tokenize_responses(tok, [getattr(ex, role) for ex in todo], None)
        for ex, ids in zip(todo, full):
            truncated += len(ids) > max_response_len
            setattr(ex, f"{role}_ids", clip_response(ids[:-1], max_response_len, tok.eos_token_id))
    for ex in examples:
        ex.prompt_text, ex.prompt_ids = memo[ex.prompt]
    return truncated


# ---- collect: every source loaded, mapped, validated (and tokenized when a tokenizer is given) ------------
def collect(cfg: PipelineConfig, tokenizer=None, include_hub: bool = True):
    """-> (pools, per-source info, BadRows, truncated count, all_loaded). Raises DataError/ConfigError."""
    dc = cfg.data
    bad = BadRows(dc.on_bad_row)
    seen: dict[tuple, str] = {}
    memo: dict[str, tuple] = {}
    pools, info, truncated, all_loaded = [], {}, 0, True
    for r in resolve_sources(dc.sources, cfg.store.endpoint_url):
        entry = {"path": r.cfg.path, "kind": r.kind, "sft_only": r.cfg.sft_only, "weight": r.cfg.weight}
        info[r.name] = entry
        if r.kind == "hub" and not include_hub:
            entry["checked"], all_loaded = False, False
            continue
        loaded = load_source(r)
        mapping = resolve_mapping(r.cfg.schema_, r.cfg.fields, r.hub, loaded.columns, r.where, r.name)
        if mapping.kind == "sft" and not r.cfg.sft_only:
            raise DataError(f"{r.name}: schema {mapping.name} has one response per prompt (no rejected); set "
                            f"`sft_only: true` on {r.where} to use it for SFT")
        splits, ties = map_rows(loaded, mapping, bad)
        for split in splits:
            splits[split] = drop_duplicates(splits[split], seen, bad)
            if tokenizer is not None:
                truncated += tokenize(splits[split], tokenizer, dc.max_response_len, memo)
                splits[split] = drop_long_prompts(splits[split], dc.max_prompt_len, bad)
        read = {s: len(rows) for s, rows in loaded.splits.items()}
        valid = sum(len(v) for v in splits.values())
        entry.update(schema=mapping.name, columns=dict(mapping.columns), read=read, valid=valid, ties=ties,
                     skipped=dict(bad.per_source.get(r.name, {})), has_eval_split=r.has_eval, checked=True)
        _log(f"{r.name}: {sum(read.values())} rows read, {valid} valid ({mapping.name})")
        if not splits.get("train"):
            raise DataError(f"{r.name}: no usable rows ({sum(read.values())} read, "
                            f"{sum(bad.per_source.get(r.name, {}).values())} skipped, {ties} ties)")
        pools.append(Pool(r.name, splits["train"], splits.get("eval"), r.cfg.weight, r.cfg.sft_only))
    return pools, info, bad, truncated, all_loaded


def check_phases(b: Blend, cfg: PipelineConfig, pools: list[Pool]) -> None:
    """Every phase with a positive share must have train rows, and eval rows where an eval split is expected."""
    dc = cfg.data
    parts = dict(zip(PHASES, parse_split(dc.data_split)))
    own_eval = any(p.eval for p in pools)
    usable = sum(len(p.train) + len(p.eval or []) for p in pools)
    for phase in PHASES:
        if parts[phase] <= 0 and not (phase == "sft" and any(p.sft_only for p in pools)):
            continue  # a phase given no share may stay empty
        for split in SPLITS:
            if split == "eval" and dc.eval_fraction <= 0 and not own_eval:
                continue
            if not b.phases[(phase, split)]:
                raise DataError(f"data: phase {phase}/{split} is empty after splitting {usable} usable rows "
                                f"(data_split {dc.data_split!r}, eval_fraction {dc.eval_fraction}); add rows or "
                                f"change data.data_split / data.eval_fraction")


# ---- statistics -----------------------------------------------------------------------------------------
def _length_stats(lengths: list[int]) -> dict | None:
    if not lengths:
        return None
    return {"min": min(lengths), "mean": round(statistics.fmean(lengths), 3), "max": max(lengths)}


def token_stats(b: Blend) -> dict:
    out: dict = {}
    for (phase, split), rows in b.phases.items():
        out.setdefault(phase, {})[split] = {
            "prompt": _length_stats([len(r.prompt_ids) for r in rows]),
            "chosen": _length_stats([len(r.chosen_ids) for r in rows if r.chosen_ids is not None]),
            "rejected": _length_stats([len(r.rejected_ids) for r in rows if r.rejected_ids is not None]),
        }
    return out


def make_summary(b: Blend, info: dict, bad: BadRows, truncated: int) -> dict:
    """The flat summary shown by `rlhf run` and stored in the manifest."""
    s: dict = {}
    for (phase, split), rows in b.phases.items():
        s[f"rows.{phase}.{split}"] = len(rows)
    s["rows.total"] = sum(len(r) for r in b.phases.values())
    for name, counts in b.per_source.items():
        s[f"source.{name}.rows"] = sum(counts.values())
        s[f"source.{name}.read"] = sum(info[name].get("read", {}).values())
    for reason, n in sorted(bad.counts.items()):
        s[f"skipped.{reason}"] = n
    s["skipped.total"] = sum(bad.counts.values())
    s["ties"] = sum(e.get("ties", 0) for e in info.values())
    every = [r for rows in b.phases.values() for r in rows]
    for role in ("prompt", "chosen", "rejected"):
        lens = [len(getattr(r, f"{role}_ids")) for r in every if getattr(r, f"{role}_ids") is not None]
        if lens:
            s[f"tokens.{role}.mean"] = round(statistics.fmean(lens), 3)
            s[f"tokens.{role}.max"] = max(lens)
    s["truncated_responses"] = truncated
    return s


def _tokenizer_info(cfg: PipelineConfig, tok) -> dict:
    from ..models import model_identity

    ref = tokenizer_ref(cfg)
    return {"ref": ref, "identity": model_identity(ref, cfg.models.tiny, cfg.models.revision),
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "pad_is_eos": tok.pad_token_id == tok.eos_token_id}


# ---- entry points ---------------------------------------------------------------------------------------
def build(cfg: PipelineConfig, tokenizer) -> tuple[Blend, dict, dict]:
    """Everything in memory: -> (blend, data_info, summary). Raises DataError/ConfigError on bad input."""
    dc = cfg.data
    pools, info, bad, truncated, _ = collect(cfg, tokenizer)
    b = blend(pools, dc.data_split, dc.eval_fraction, dc.seed)
    check_phases(b, cfg, pools)
    for name, counts in b.per_source.items():
        info[name]["used"] = counts
    counts = {ph: {s: len(b.phases[(ph, s)]) for s in SPLITS} for ph in PHASES}
    data_info = {
        "format": artifact.FORMAT,
        "columns": list(artifact.COLUMNS),
        "prompt_format": "chat_template" if has_chat_template(tokenizer) else "human_assistant",
        "tokenizer": _tokenizer_info(cfg, tokenizer),
        "data_split": dc.data_split, "eval_fraction": dc.eval_fraction, "seed": dc.seed,
        "max_prompt_len": dc.max_prompt_len, "max_response_len": dc.max_response_len, "on_bad_row": dc.on_bad_row,
        "counts": counts, "sources": info, "skipped": dict(bad.counts), "skipped_examples": bad.examples,
        "truncated_responses": truncated, "token_stats": token_stats(b),
    }
    return b, data_info, make_summary(b, info, bad, truncated)


def validate_sources(cfg: PipelineConfig, tokenizer=None, include_hub: bool = False) -> dict:
    """Check every source before anything is launched: paths, schemas, every row, weights, and that no phase is
    empty. Cheap: no artifact is written; hub datasets are only checked by name unless `include_hub`; prompt
    lengths are checked only when a tokenizer is given. Raises ConfigError / DataError with one-line messages
    (`source:row:field: reason`). Returns {"sources": per-source info, "counts": {phase: {split: n}} | None,
    "skipped": {reason: n}}."""
    pools, info, bad, _, all_loaded = collect(cfg, tokenizer, include_hub=include_hub)
    counts = None
    if all_loaded:
        b = blend(pools, cfg.data.data_split, cfg.data.eval_fraction, cfg.data.seed)
        check_phases(b, cfg, pools)
        counts = {ph: {s: len(b.phases[(ph, s)]) for s in SPLITS} for ph in PHASES}
    return {"sources": info, "counts": counts, "skipped": dict(bad.counts)}


def prepare(cfg: PipelineConfig, out_dir: str | Path, tokenizer=None) -> dict:
    """Build the data artifact's files in `out_dir` (created; must be empty) and return the flat summary."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    tok = tokenizer if tokenizer is not None else load_data_tokenizer(cfg)
    b, data_info, summary = build(cfg, tok)  # every check happens here, before the first write
    out.mkdir(parents=True, exist_ok=True)
    for (phase, split), rows in b.phases.items():
        artifact.write_phase(out, phase, split, rows)
    artifact.write_json(out / "data_info.json", data_info)
    artifact.write_json(out / "metrics.json", {"summary": summary, "counts": data_info["counts"],
                                               "token_stats": data_info["token_stats"]})
    _log(" ".join(f"{ph}: {len(b.phases[(ph, 'train')])}+{len(b.phases[(ph, 'eval')])}" for ph in PHASES)
         + " rows (train+eval)")
    return summary


def check_sources_unchanged(cfg: PipelineConfig, planned: list[dict] | None) -> None:
    """The data key names the sources' content at plan time; a source rewritten since (a bucket object replaced
    while the job queued) would make an artifact its key does not describe. DataError naming the source."""
    from ..stages import data_source_fingerprints

    if planned is None:
        return
    for i, (now, then) in enumerate(zip(data_source_fingerprints(cfg), planned)):
        if now != then:
            raise DataError(f"data.sources[{i}].path: {cfg.data.sources[i].path} changed since the plan; run again")


def run(spec) -> str:
    """The stage job: build the artifact in the job's scratch folder and commit it under the stage key."""
    from ..stages import commit_stage_output, hub_pins

    store = spec.open_store()
    if store.exists(spec.stage, spec.key):
        _log(f"cached: {spec.output_uri}")
        return spec.output_uri
    cfg = spec.pipeline_config()
    check_sources_unchanged(cfg, spec.key_inputs.get("sources"))
    pin = hub_pins(spec.key_inputs).get(tokenizer_ref(cfg))
    if pin:  # a hub tokenizer: load (and record in data_info) exactly the commit the data key names
        cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"revision": pin})})
    scratch = Path(spec.run_dir) if spec.run_dir else Path(tempfile.mkdtemp(prefix="rlhf-data-"))
    out = scratch / "data-artifact"
    shutil.rmtree(out, ignore_errors=True)  # leftovers of an earlier try of this job
    try:
        summary = prepare(cfg, out)
        uri = commit_stage_output(spec, out, summary)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not spec.run_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    _log(f"committed {uri}")
    return uri
