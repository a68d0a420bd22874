"""The evaluation stage end to end on tiny models: real upstream artifacts in a local store, the stage run in
process and as a job (`python -m rlhf_tasks.stage_main`), reproducible numbers, a complete report.

The upstream artifacts are built here (test setup): tiny HF models saved into folders laid out as the SFT, reward
and PPO stages write them, a data artifact with ppo/eval prompts and reward/eval pairs, each with a metrics.json
history, committed to the store with put_dir.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_tasks import models
from rlhf_tasks.config import EvalConfig, PipelineConfig, TinyModelConfig
from rlhf_tasks.data import demo
from rlhf_tasks.data.formatting import tokenize_example
from rlhf_tasks.evaluation import report, stage
from rlhf_tasks.stages import StageSpec
from rlhf_tasks.store import ArtifactStore

ROOT = Path(__file__).resolve().parent.parent
SHAPE = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
EVAL = EvalConfig(num_prompts=6, num_pairs=8, max_new_tokens=6, batch_size=4, num_samples_in_report=3, seed=7)



def _data_artifact(d: Path, tok) -> None:
    rows = demo.generate(20, seed=3)
    cols = ("source", "row", "prompt", "chosen", "rejected", "prompt_text", "prompt_ids", "chosen_ids",
            "rejected_ids", "gold")

    def write(phase, split, part, with_pairs):
        recs = []
        for i, r in enumerate(part, 1):
            ex = tokenize_example(tok, r["prompt"], r["chosen"], 16)
            rej = tokenize_example(tok, r["prompt"], r["rejected"], 16)["response_ids"]
            gold = r["gold"] if i % 3 else None  # some rows have no gold scorer
            recs.append(dict(source="demo", row=i, prompt=r["prompt"], chosen=r["chosen"],
                             rejected=r["rejected"] if with_pairs else None, prompt_text=ex["prompt_text"],
                             prompt_ids=ex["prompt_ids"], chosen_ids=ex["response_ids"],
                             rejected_ids=rej if with_pairs else None, gold=gold))
        (d / phase).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({c: [r[c] for r in recs] for c in cols}), d / phase / f"{split}.parquet")

    write("ppo", "eval", rows[:10], False)
    write("reward", "eval", rows[10:], True)
    (d / "metrics.json").write_text(json.dumps({"summary": {"rows": 20}}))


def _perturbed(src: Path, dst: Path, seed: int, std: float) -> None:
    model = models.load_causal_lm(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(dst)
    models.load_tokenizer(str(src)).save_pretrained(dst)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A local store with data, sft, reward and ppo (actor + ema) artifacts; returns (store, {stage: uri})."""
    root = tmp_path_factory.mktemp("eval-upstream")
    store = ArtifactStore(str(root / "store"), cache_dir=root / "cache")
    base = models.ensure_tiny_model("llama", SHAPE)
    tok = models.load_tokenizer(str(base))
    uris = {}

    d = root / "data"
    _data_artifact(d, tok)
    uris["data"] = store.put_dir(d, "data", "d0")

    d = root / "sft"
    _perturbed(base, d, seed=1, std=0.05)
    (d / "metrics.json").write_text(json.dumps({"summary": {"loss": 2.0}, "history": [
        {"step": s, "loss": 4.0 / s, "lr": 1e-3} for s in range(1, 8)]}))
    uris["sft"] = store.put_dir(d, "sft", "s0")

    d = root / "reward"
    torch.manual_seed(2)  # the new score head's init
    rm = models.load_score_model(str(base))
    rm.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "metrics.json").write_text(json.dumps({"summary": {"accuracy": 0.7}, "history": [
        {"step": s, "loss": 0.7 - 0.05 * s, "accuracy": 0.5 + 0.04 * s} for s in range(1, 6)]}))
    uris["reward"] = store.put_dir(d, "reward", "r0")

    d = root / "ppo"
    _perturbed(root / "sft", d / "actor", seed=2, std=0.05)
    shutil.copytree(root / "sft", d / "ema", ignore=shutil.ignore_patterns("metrics.json"))  # EMA == reference
    (d / "metrics.json").write_text(json.dumps({"summary": {"reward_mean": 0.3}, "history": [
        {"step": s, "reward/score_mean": 0.1 * s, "kl/ref": 0.02 * s, "response/length": 8 + s, "gold": 0.1 * s,
         "entropy": 2.0 - 0.1 * s}
        for s in range(1, 10)]}))
    uris["ppo"] = store.put_dir(d, "ppo", "p0")
    return store, uris


def _spec(store, uris, key: str, run_dir: Path) -> StageSpec:
    cfg = PipelineConfig(experiment="eval-test", eval=EVAL)
    cfg.execution.device = "cpu"
    return StageSpec(stage="eval", key=key, config=cfg.model_dump(mode="json", by_alias=True), inputs=dict(uris),
                     output_uri=store.uri("eval", key), store=store.settings(), key_inputs={"test": key},
                     run_dir=str(run_dir))


def _numbers(folder: Path) -> tuple[dict, list]:
    doc = json.loads((folder / "metrics.json").read_text())
    summary = {k: v for k, v in doc["summary"].items() if k != "eval_seconds"}
    return summary, json.loads((folder / "samples.json").read_text())


@pytest.fixture(scope="module")
def evaluated(upstream, tmp_path_factory):
    """The stage run once in process: (store, eval URI)."""
    store, uris = upstream
    uri = stage.run(_spec(store, uris, "e1", tmp_path_factory.mktemp("run1")))
    return store, uri


def test_stage_run_as_a_job_reproduces_the_numbers(upstream, evaluated, tmp_path):
    store, uris = upstream
    _, uri1 = evaluated
    assert uri1 == store.uri("eval", "e1") and store.exists("eval", "e1")
    spec2 = _spec(store, uris, "e2", tmp_path / "run2")
    spec_file = tmp_path / "spec2.json"
    spec_file.write_text(spec2.to_json())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks.stage_main", str(spec_file)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval: committed" in proc.stdout

    a, b = store.get_uri(uri1), store.get_uri(spec2.output_uri)
    s1, samples1 = _numbers(a)
    s2, samples2 = _numbers(b)
    assert s1 == s2 and samples1 == samples2  # identical numbers and answers, run twice
    assert (a / "report.md").read_text() == (b / "report.md").read_text().replace("/eval/e2", "/eval/e1")
    # the manifest carries the flat summary shown by `rlhf run`
    assert store.read_manifest("eval", "e1").metrics["rm_ppo"] == s1["rm_ppo"]


def test_summary_is_consistent_with_the_samples(evaluated):
    store, uri = evaluated
    folder = store.get_uri(uri)
    s, samples = _numbers(folder)
    for key in ("rm_sft", "rm_ppo", "rm_ema", "gold_sft", "gold_ppo", "win_rate_rm", "win_rate_gold", "kl_ppo_ref",
                "kl_ema_ref", "len_sft", "len_ppo", "eos_rate_sft", "eos_rate_ppo", "rm_accuracy", "num_prompts"):
        assert key in s, key
    assert len(samples) == s["num_prompts"] == 6
    assert s["rm_ppo"] == pytest.approx(sum(x["ppo"]["rm"] for x in samples) / 6)
    gold_rows = [x for x in samples if x["gold_scorer"]]
    assert 0 < len(gold_rows) < 6  # rows without a gold scorer are left out of gold_*
    assert s["gold_sft"] == pytest.approx(sum(x["sft"]["gold"] for x in gold_rows) / len(gold_rows))
    for x in gold_rows:
        assert x["ppo"]["gold"] == pytest.approx(demo.gold_score(x["prompt"], x["ppo"]["response"]))
    assert all(x["sft"]["length"] <= EVAL.max_new_tokens for x in samples)
    # the EMA folder is a copy of the reference: zero KL, same scores, every prompt a tie
    assert s["kl_ema_ref"] == 0.0 and s["kl_ema_ref_exact"] == 0.0
    assert s["rm_ema"] == s["rm_sft"] and s["win_rate_rm_ema"] == 0.5
    assert s["kl_ppo_ref"] != 0.0 and s["kl_ppo_ref_exact"] > 0.0
    assert 0.0 <= s["rm_accuracy"] <= 1.0 and s["num_pairs"] == 8
    # both decodings: the primary (greedy here) unprefixed and as greedy/, the other as sampled/ and per sample
    for key in ("gold_ppo", "kl_ppo_ref_exact", "distinct2_ppo", "repetition_sft", "gold_gain", "gold_sign_p"):
        assert s[key] == s[f"greedy/{key}"], key
    assert s["sampled/rm_ppo"] == pytest.approx(sum(x["ppo"]["sampled"]["rm"] for x in samples) / 6)
    assert [x["sft"]["sampled"]["response"] for x in samples] != [x["sft"]["response"] for x in samples]
    assert s["gold_gain_ci_low"] <= s["gold_gain"] <= s["gold_gain_ci_high"]
    assert s["gold_gain"] == pytest.approx(s["gold_ppo"] - s["gold_sft"])
    # the report: every section, real plots of every upstream stage with a history
    text = (folder / "report.md").read_text()
    assert text.splitlines()[2].startswith("**Verdict: ")
    for section in report.SECTIONS:
        assert section in text
    assert "PPO (EMA)" in text
    for name in ("ppo_glance", "sft", "reward", "ppo", "eval_scores"):
        png = folder / "plots" / f"{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "metrics.json").read_text())["samples"] == samples[:3]


def test_empty_prompt_split_is_a_data_error(upstream, tmp_path):
    from rlhf_tasks.errors import DataError

    store, uris = upstream
    data = tmp_path / "data"
    shutil.copytree(store.get_uri(uris["data"]), data)
    t = pq.read_table(data / "ppo" / "eval.parquet").slice(0, 0)
    pq.write_table(t, data / "ppo" / "eval.parquet")
    inputs = stage.EvalInputs(data, store.get_uri(uris["sft"]), store.get_uri(uris["reward"]))
    with pytest.raises(DataError, match="ppo/eval split is empty"):
        stage.evaluate(inputs, EVAL, torch.device("cpu"))
