"""The demo task with DPO (tiny models, CPU, minutes): DPO from the demo's SFT policy on its preference pairs raises
the held-out gold score of sampled answers (a gold win rate over SFT above one half and a higher mean gold), and the
same run with every pair's chosen and rejected swapped does not. The SFT policy is test_ppo_demo's (built once,
cached), the held-out prompts too; answers are sampled as the demo's eval stage samples them (seeded)."""
import pytest
import torch

from rlhf_tasks.config.stages import DPOConfig
from rlhf_tasks.data import demo
from rlhf_tasks.evaluation import generation, metrics
from rlhf_tasks.models import load_causal_lm, load_tokenizer
from rlhf_tasks.training import dpo

from test_ppo_demo import _rows, demo_models, fmt  # noqa: F401  (demo_models is a fixture)

pytestmark = pytest.mark.slow
# the tiny preset's dpo section (rlhf_tasks/presets/tiny.yaml) on the test's SFT policy
DPO = dict(micro_batch_size=16, max_seq_len=64, beta=0.1, epochs=1, max_steps=70, seed=1,
           optim={"lr": 5e-5, "warmup_ratio": 0.05})
MARGIN = 0.05  # mean gold gain over SFT that DPO must exceed and the sign-flipped run must not


def _pairs(tok, rows, flip: bool) -> dict:
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    chosen, rejected = ("rejected", "chosen") if flip else ("chosen", "rejected")
    return {"prompt_ids": [enc(fmt(r["prompt"])) for r in rows],
            "chosen_ids": [enc(" " + r[chosen]) + [tok.eos_token_id] for r in rows],
            "rejected_ids": [enc(" " + r[rejected]) + [tok.eos_token_id] for r in rows]}


def sampled_gold(model, tok, held, samples: int = 2) -> list[float]:
    """Gold of `samples` seeded sampled answers per held-out prompt (the same RNG stream for every policy)."""
    tok.padding_side = "left"
    prompt_ids = [tok(fmt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in held] * samples
    cfg = generation.generation_config(tok, max_new_tokens=16, do_sample=True)
    resp = generation.generate(model, tok, prompt_ids, batch_size=64, device=torch.device("cpu"), gen_cfg=cfg,
                               seed=1234)
    return [demo.gold_score(r["prompt"], tok.decode(a, skip_special_tokens=True).strip())
            for r, a in zip(held * samples, resp)]


def run_dpo(models, flip: bool) -> tuple[float, float, float]:
    """DPO from the demo SFT policy -> (SFT's mean held-out gold, DPO's, DPO's gold win rate over SFT)."""
    tok = load_tokenizer(str(models / "sft"), "right")
    train, held = _rows()
    sft = load_causal_lm(str(models / "sft"), dropout=0.0)
    before = sampled_gold(sft, tok, held)
    tok.padding_side = "right"
    evals = _pairs(tok, held, flip)
    result = dpo.fit(load_causal_lm(str(models / "sft")), tok, _pairs(tok, train, flip), evals, DPOConfig(**DPO))
    from rlhf_tasks.training.engine import plain_hf_model

    after = sampled_gold(plain_hf_model(result.engine), tok, held)
    s = result.summary
    print(f"DPO{' (flipped pairs)' if flip else ''}: implicit-reward accuracy {s['eval_accuracy_before']:.3f} -> "
          f"{s['eval_accuracy']:.3f}, margin {s['eval_margin']:.3f}")
    return sum(before) / len(before), sum(after) / len(after), metrics.win_rate(after, before)


def test_dpo_improves_gold_and_swapped_pairs_do_not(demo_models):  # noqa: F811
    before, after, win = run_dpo(demo_models, flip=False)
    print(f"DPO: sampled gold {before:.3f} -> {after:.3f}, gold win rate {win:.3f}")
    assert after - before > MARGIN and win > 0.5
    f_before, f_after, f_win = run_dpo(demo_models, flip=True)
    print(f"DPO on swapped pairs: sampled gold {f_before:.3f} -> {f_after:.3f}, gold win rate {f_win:.3f}")
    assert f_before == pytest.approx(before)
    assert f_after - f_before < MARGIN and f_win < win


def test_rlhf_run_method_dpo_reuses_a_ppo_runs_data_sft_and_reward(tmp_path):
    """`rlhf run --set method=dpo` on a store where a PPO run went first (a short demo: 600 rows, 2 PPO steps, 12
    DPO steps, 24 eval prompts): data, sft and reward come from the store, dpo and eval run (through the Prefect
    flow), and the eval report compares SFT with the DPO policy under the method's name."""
    import json
    import subprocess
    import sys

    short = ["--set", "data.sources=[{path: demo, max_rows: 600}]", "--set", "ppo.total_steps=2",
             "--set", "dpo.max_steps=12", "--set", "eval.num_prompts=24", "--set", f"execution.runs_dir={tmp_path}/runs"]
    store = str(tmp_path / "store")

    def rlhf(*args) -> dict:
        out = tmp_path / "summary.json"
        r = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", "run", "--store", store, *short, *args,
                            "--summary-json", str(out)], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(out.read_text())

    ppo = rlhf("--no-prefect")
    assert {s: v["status"] for s, v in ppo["stages"].items()} == dict.fromkeys(
        ["data", "sft", "reward", "ppo", "eval"], "ran")
    dpo = rlhf("--set", "method=dpo")
    assert {s: v["status"] for s, v in dpo["stages"].items()} == {
        "data": "cached", "sft": "cached", "reward": "cached", "dpo": "ran", "eval": "ran"}
    assert {s: dpo["stages"][s]["uri"] for s in ("data", "sft", "reward")} == {
        s: ppo["stages"][s]["uri"] for s in ("data", "sft", "reward")}
    dpo_metrics = dpo["stages"]["dpo"]["metrics"]
    assert dpo_metrics["steps"] == 12 and dpo_metrics["eval_accuracy"] > dpo_metrics["eval_accuracy_before"]
    ev = dpo["stages"]["eval"]["metrics"]
    assert {"gold_sft", "gold_ppo", "win_rate_gold", "rm_ppo", "kl_ppo_ref"} <= set(ev)  # the DPO policy's slot
    from rlhf_tasks.store import ArtifactStore

    folder = ArtifactStore(store).get_uri(dpo["stages"]["eval"]["uri"])
    report = (folder / "report.md").read_text()
    assert report.startswith("# RLHF evaluation: demo (method DPO)") and "DPO sampled" in report
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["meta"]["method"] == "dpo" and "dpo" in doc["meta"]["inputs"]
