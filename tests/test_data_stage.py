"""The data stage end to end: stage key, artifact in the store, cache hits, failures that leave nothing behind."""
import json
from collections import Counter

import pytest

from rlhf_tasks import stages
from rlhf_tasks.config import config_from_dict
from rlhf_tasks.errors import DataError
from rlhf_tasks.store import compute_key


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n, tag):
    return [{"prompt": f"Describe the {tag} {i}.", "chosen": f"the {tag} is warm and calm {i}",
             "rejected": f"bad {tag} {i}"} for i in range(n)]


def two_source_cfg(tmp_path, store_url="unused"):
    a = write_jsonl(tmp_path / "a.jsonl", pairs(150, "cat"))
    b = write_jsonl(tmp_path / "b.jsonl", pairs(300, "dog"))
    return config_from_dict({
        "store": {"url": store_url},
        "data": {"sources": [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 2.0}], "data_split": "2,4,4"},
    })


def data_key(cfg):
    return compute_key(stages.stage_key_inputs(cfg, "data", {}))


def run_data_stage(cfg, store, tmp_path):
    from rlhf_tasks.data.stage import run

    (p,) = stages.plan(cfg, store, until="data")
    spec = stages.make_spec(cfg, store, p, tmp_path / "run")
    return p, run(spec)


def test_two_weighted_sources_make_a_disjoint_artifact_and_rerun_is_cached(tmp_path, any_store):
    from rlhf_tasks.data.artifact import load_phase, read_info

    cfg = two_source_cfg(tmp_path)
    p, uri = run_data_stage(cfg, any_store, tmp_path)
    assert not p.cached and uri == p.uri and any_store.exists("data", p.key)

    local = any_store.get("data", p.key)
    info = read_info(uri, store=any_store)
    eos = info["tokenizer"]["eos_token_id"]
    seen, per_source = set(), Counter()
    for phase in ("sft", "reward", "ppo"):
        for split in ("train", "eval"):
            ds = load_phase(uri, phase, split, store=any_store)  # by URI (S3: downloaded, verified)
            assert len(ds) > 0
            assert ds.column_names == ["source", "row", "prompt", "chosen", "rejected", "prompt_text", "prompt_ids",
                                       "chosen_ids", "rejected_ids", "gold"]
            c = Counter(ds["source"])
            assert abs(c["b"] - 2 * c["a"]) <= 3, (phase, split, c)  # counts match the 1:2 weights
            ids = set(zip(ds["source"], ds["row"]))
            assert not ids & seen  # phases and splits are disjoint
            seen |= ids
            per_source.update(c)
            answers = list(ds["chosen_ids"]) + list(ds["rejected_ids"])
            assert all(x[-1] == eos for x in answers)  # every answer ends with EOS
    assert per_source == {"a": 150, "b": 300}
    assert info["counts"]["sft"]["train"] + info["counts"]["sft"]["eval"] < info["counts"]["reward"]["train"]
    assert info["tokenizer"]["pad_is_eos"] is False and info["prompt_format"] == "human_assistant"
    summary = any_store.verify("data", p.key).metrics
    assert summary["rows.total"] == 450 and summary["source.b.rows"] == 300 and "tokens.prompt.mean" in summary
    assert json.loads((local / "metrics.json").read_text())["summary"] == summary

    (again,) = stages.plan(cfg, any_store, until="data")  # second run: a cache hit
    assert again.cached and again.key == p.key
    assert run_data_stage(cfg, any_store, tmp_path)[1] == uri


def test_broken_row_fails_with_location_and_leaves_nothing_in_the_store(tmp_path, local_store):
    rows = pairs(50, "cat")
    rows[9]["chosen"] = ""
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    cfg = config_from_dict({"data": {"sources": [{"path": str(path)}]}})
    with pytest.raises(DataError, match=r"^broken:10:chosen: empty string"):
        run_data_stage(cfg, local_store, tmp_path)
    assert list(local_store.ls()) == [] and local_store.kinds() == []
    assert not (tmp_path / "run" / "data-artifact").exists()


def test_stage_key_changes_with_one_row_and_only_then(tmp_path):
    cfg = two_source_cfg(tmp_path)
    k1 = data_key(cfg)
    assert data_key(two_source_cfg(tmp_path)) == k1  # same inputs, same key
    rows = pairs(300, "dog")
    rows[123]["rejected"] = "a different answer"
    write_jsonl(tmp_path / "b.jsonl", rows)
    k2 = data_key(cfg)
    assert k2 != k1
    write_jsonl(tmp_path / "b.jsonl", pairs(300, "dog"))
    assert data_key(cfg) == k1
    changed = cfg.model_copy(deep=True)
    changed.data.data_split = "1,1,1"
    assert data_key(changed) != k1
    other_tok = cfg.model_copy(deep=True)
    other_tok.models.tiny.vocab_size = 256
    assert data_key(other_tok) != k1


def test_validate_sources_is_cheap_and_clear(tmp_path):
    from rlhf_tasks.data.stage import validate_sources

    cfg = two_source_cfg(tmp_path)
    report = validate_sources(cfg)
    assert sum(report["counts"]["reward"].values()) > 0 and report["sources"]["a"]["valid"] == 150
    rows = pairs(20, "cat")
    rows[3]["rejected"] = rows[3]["chosen"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"^bad:4:rejected:"):
        validate_sources(config_from_dict({"data": {"sources": [{"path": str(bad)}]}}))
    hub = config_from_dict({"data": {"sources": [{"path": "Dahoas/rm-static"}]}})
    assert validate_sources(hub)["sources"]["rm-static"]["checked"] is False  # offline: hub sets are not loaded


def test_demo_source_prepares(tmp_path):
    from rlhf_tasks.data.artifact import load_phase
    from rlhf_tasks.data.demo import gold_score
    from rlhf_tasks.data.stage import prepare

    cfg = config_from_dict({"data": {"sources": [{"path": "demo"}], "max_prompt_len": 32, "max_response_len": 24}})
    summary = prepare(cfg, tmp_path / "out")
    assert summary["rows.total"] == 3000 and summary["skipped.total"] == 0 and summary["truncated_responses"] == 0
    ds = load_phase(tmp_path / "out", "reward", "eval")
    assert set(ds["gold"]) == {"demo"}
    assert all(gold_score(p, c) > gold_score(p, r) for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"]))
