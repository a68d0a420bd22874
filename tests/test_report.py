"""The report: every section, real PNG plots, robustness to missing keys, `rlhf report` forms, publishing."""
import json
from pathlib import Path

import matplotlib.image as mpimg

from rlhf_tasks.cli import main
from rlhf_tasks.evaluation import report

SUMMARY = {"rm_sft": 0.1, "rm_sft_std": 0.2, "rm_ppo": 0.6, "rm_ppo_std": 0.3, "gold_sft": 0.4, "gold_sft_std": 0.5,
           "gold_ppo": 1.1, "gold_ppo_std": 0.4, "win_rate_rm": 0.75, "win_rate_gold": 0.7, "kl_ppo_ref": 1.5,
           "kl_ppo_ref_std": 0.5, "len_sft": 9.0, "len_ppo": 11.0, "eos_rate_sft": 0.9, "eos_rate_ppo": 1.0,
           "rm_accuracy": 0.8, "rm_margin": 0.7, "num_pairs": 20.0, "num_prompts": 3.0}
CURVES = {
    "sft": [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 11)],
    "reward": [{"step": s, "loss": 0.7 - 0.02 * s, "accuracy": 0.5 + 0.03 * s} for s in range(1, 11)]
    + [{"step": 10, "eval_accuracy": 0.8, "note": "text values are skipped"}],
    "ppo": [{"step": s, "reward_mean": 0.1 * s, "kl": 0.05 * s, "response_length": 10 + s, "gold": 0.4 + 0.05 * s,
             "eos_rate": 1.0} for s in range(1, 16)],
    "data": [],
}


def _samples(n=3):
    return [{"index": i, "prompt": f"Describe the cat | {i}.", "gold_scorer": "demo",
             "sft": {"response": "the cat is fine\nok", "rm": 0.1 * i, "gold": 0.3, "length": 6, "eos": True},
             "ppo": {"response": "the cat is warm and calm", "rm": 0.5 + 0.1 * i, "gold": 1.2, "length": 7,
                     "eos": True, "kl": 1.0}} for i in range(n)]


def make_eval_folder(d: Path, summary=SUMMARY, curves=CURVES, samples=None, meta=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    samples = _samples() if samples is None else samples
    meta = meta or {"experiment": "unit", "inputs": {"data": "s3://b/data/k0", "ppo": "s3://b/ppo/k3"},
                    "output_uri": "s3://b/eval/k4", "config": {"num_samples_in_report": 2, "max_new_tokens": 16}}
    (d / "metrics.json").write_text(json.dumps({"summary": summary, "samples": samples[:2], "meta": meta}))
    (d / "samples.json").write_text(json.dumps(samples))
    (d / "curves.json").write_text(json.dumps(curves))
    return d


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    img = mpimg.imread(path)
    assert img.shape[0] >= 200 and img.shape[1] >= 300, (path, img.shape)
    assert img.std() > 0.01  # not a blank canvas


def test_report_has_every_section_and_plots(tmp_path):
    src = make_eval_folder(tmp_path / "eval")
    path = report.write_report(src, src)
    text = path.read_text()
    for section in report.SECTIONS:
        assert section in text
    assert "| reward-model score (mean ± std) | 0.100 ± 0.200 | 0.600 ± 0.300 |" in text
    assert "| win rate vs SFT, reward model | — | 0.750 |" in text
    assert "| KL to reference (SFT), nats/answer | — | 1.500 ± 0.500 |" in text
    assert "**0.800**" in text  # RM pairwise accuracy
    assert "Describe the cat \\| 0." in text and "fine<br>ok" in text  # cells escaped
    assert "Describe the cat \\| 2." not in text  # num_samples_in_report = 2
    assert "s3://b/ppo/k3" in text
    for name in ("sft", "reward", "ppo", "eval_scores"):
        assert f"](plots/{name}.png)" in text
        _png_ok(src / "plots" / f"{name}.png")
    assert not (src / "plots" / "data.png").exists()  # empty history: no plot


def test_report_is_robust_to_missing_keys(tmp_path):
    summary = {"rm_sft": 0.1, "rm_ppo": 0.2, "num_prompts": 1.0}
    samples = [{"prompt": "p", "sft": {"response": "", "rm": 0.1}, "ppo": {"response": "x", "rm": 0.2}}]
    src = make_eval_folder(tmp_path / "eval", summary=summary, curves={"ppo": [{"kl": 0.1}, {"kl": 0.2}]},
                           samples=samples, meta={"config": {}})
    (src / "curves.json").unlink()  # older artifact without curves: no training plots, still a report
    text = report.write_report(src, tmp_path / "out").read_text()
    for section in report.SECTIONS:
        assert section in text
    assert "gold" not in report.markdown_table(report.comparison_rows(summary))
    assert "No held-out reward pairs" in text
    assert (tmp_path / "out" / "plots" / "eval_scores.png").is_file()
    assert not (tmp_path / "out" / "plots" / "ppo.png").exists()


def test_history_series_skips_non_numeric_and_orders_keys():
    from rlhf_tasks.evaluation import plots

    data = plots.series([{"step": 1, "zeta": 1, "loss": 2.0, "flag": True, "s": "x"}, {"loss": 1.0}])
    assert set(data) == {"zeta", "loss"}
    assert data["loss"] == ([1.0, 1.0], [2.0, 1.0])  # x falls back to the row index
    assert plots.order_keys(["zeta", "kl", "train_loss", "accuracy"]) == ["train_loss", "accuracy", "kl", "zeta"]


def test_rlhf_report_from_uri_run_id_and_record_file(tmp_path, local_store, capsys):
    src = make_eval_folder(tmp_path / "eval")
    uri = local_store.put_dir(src, "eval", "k4", metrics=SUMMARY)
    # 1) the eval artifact URI
    assert main(["report", uri, "--out", str(tmp_path / "r1")]) == 0
    out1 = Path(capsys.readouterr().out.strip())
    assert out1 == tmp_path / "r1" / "report.md" and "## Comparison" in out1.read_text()
    _png_ok(tmp_path / "r1" / "plots" / "ppo.png")
    # 2) a run id whose record lies in the store
    local_store.write_json("runs/run-7.json", {"run_id": "run-7", "stages": [
        {"stage": "ppo", "uri": "x/ppo/k3"}, {"stage": "eval", "status": "ran", "uri": uri}]})
    assert main(["report", "run-7", "--store", local_store.url, "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "report.md").read_text() == out1.read_text()
    # 3) a run summary JSON file
    rec = tmp_path / "summary.json"
    rec.write_text(json.dumps({"stages": {"eval": {"status": "cached", "uri": uri}}}))
    assert main(["report", str(rec), "--out", str(tmp_path / "r3")]) == 0
    assert (tmp_path / "r3" / "report.md").is_file()
    # bad input: exit 2 with one line
    assert main(["report", "no-such-run", "--store", local_store.url]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_find_eval_uri_layouts():
    assert report.find_eval_uri({"stages": {"eval": {"uri": "u"}}}) == "u"
    flows_record = {"run_id": "r", "config": {"eval": {"num_prompts": 8}}, "stages": {"eval": {"status": "ran",
                    "uri": "s3://b/eval/k"}}, "eval_uri": "s3://b/eval/k"}
    assert report.find_eval_uri(flows_record) == "s3://b/eval/k"
    assert report.find_eval_uri({"stages": [{"stage": "eval", "artifact_uri": "v"}]}) == "v"
    assert report.find_eval_uri({"uris": {"eval": "s3://b/eval/k"}}) == "s3://b/eval/k"
    assert report.find_eval_uri({"stages": [{"stage": "sft", "uri": "w"}]}) is None


def test_publish_report_through_callables(tmp_path):
    src = make_eval_folder(tmp_path / "eval")
    report.write_report(src, src)
    calls = []

    def markdown(markdown, key, description):
        calls.append(("md", key, markdown))
        return "id-md"

    def table(table, key, description):
        calls.append(("table", key, table))
        return f"id-{key}"

    got = report.publish_report(src, markdown=markdown, table=table, key="Demo_Run eval")
    assert got == ["id-md", "id-demo-run-eval-summary", "id-demo-run-eval-samples"]
    md = calls[0][2]
    assert calls[0][1] == "demo-run-eval-report"
    assert md.count("data:image/png;base64,") == 4 and "## Sample answers" in md
    summary_rows = calls[1][2]
    assert summary_rows[0] == {"metric": "reward-model score (mean ± std)", "SFT": "0.100 ± 0.200",
                               "PPO": "0.600 ± 0.300"}
    assert len(calls[2][2]) == 2 and "PPO answer" in calls[2][2][0]
    # linking instead of embedding
    md2 = report.embed_plots("![x](plots/ppo.png)", src, image_url=lambda rel: f"https://h/{rel}")
    assert md2 == "![x](https://h/plots/ppo.png)"


def test_publish_from_a_store_uri_and_run_id(tmp_path, any_store):
    """The flow's call: publish_report(eval URI or run id, store=its store) on a local folder and on S3 (moto)."""
    src = make_eval_folder(tmp_path / "eval")
    report.write_report(src, src)
    uri = any_store.put_dir(src, "eval", "k9", metrics=SUMMARY)
    any_store.write_json("runs/r9.json", {"run_id": "r9", "eval_uri": uri})
    for target in (uri, "r9"):
        got: dict = {}
        report.publish_report(target, store=any_store, markdown=lambda **kw: got.update(kw))
        assert got["key"] == "rlhf-eval-report" and "## Training curves" in got["markdown"]
        assert got["markdown"].count("data:image/png;base64,") == 4


def _two_decodings(greedy_gain=(0.2, 0.1, 0.3), sampled_gain=(0.05, -0.02, 0.12), rep=(0.0, 0.0, 0.0, 0.0),
                   distinct2=(0.9, 0.85, 0.9, 0.9)):
    """A summary with greedy/ and sampled/ keys: gains (mean, ci_low, ci_high) of PPO over SFT, repetition and
    distinct-2 as (sft greedy, ppo greedy, sft sampled, ppo sampled)."""
    s = {"num_prompts": 64.0, "win_rate_rm": 0.7}
    for i, (d, gain) in enumerate((("greedy", greedy_gain), ("sampled", sampled_gain))):
        for j, p in enumerate(("sft", "ppo")):
            s.update({f"{d}/rm_{p}": 0.1 + j, f"{d}/gold_{p}": 0.5 + j * gain[0], f"{d}/repetition_{p}": rep[2 * i + j],
                      f"{d}/distinct2_{p}": distinct2[2 * i + j]})
        s.update({f"{d}/gold_gain": gain[0], f"{d}/gold_gain_ci_low": gain[1], f"{d}/gold_gain_ci_high": gain[2],
                  f"{d}/gold_sign_p": 0.01, f"{d}/kl_ppo_ref_exact": 2.5})
    return s


def test_verdict_is_decided_on_the_primary_decodings_interval():
    s = _two_decodings()
    line = report.verdict(s, "greedy")
    assert line.startswith("**Verdict: PPO beat SFT on gold beyond noise** over 64 held-out prompts")
    assert "greedy answers +0.200 (95% CI +0.100 to +0.300, sign test p = 0.01)" in line
    assert "sampled +0.050 (95% CI -0.020 to +0.120" in line and "KL to SFT 2.50 nats/answer" in line
    assert "no gold difference between PPO and SFT beyond noise" in report.verdict(s, "sampled")
    worse = _two_decodings(greedy_gain=(-0.2, -0.3, -0.1))
    assert "PPO is worse than SFT on gold beyond noise" in report.verdict(worse, "greedy")
    assert "no gold scorer" in report.verdict({"win_rate_rm": 0.6, "num_prompts": 3.0})
    assert report.verdict({"rm_sft": 0.1}) == ""


def test_report_flags_greedy_loops_and_collapse(tmp_path):
    assert report.degeneration_notes(_two_decodings()) == []
    loops = report.degeneration_notes(_two_decodings(rep=(0.4, 0.5, 0.05, 0.0)))  # only greedy answers loop
    assert len(loops) == 1 and "SFT greedy (0.40), PPO greedy (0.50)" in loops[0]
    assert "only greedy answers loop" in loops[0] and "judge them by the sampled answers" in loops[0]
    hack = report.degeneration_notes(_two_decodings(rep=(0.0, 0.5, 0.0, 0.6)))
    assert "only PPO's answers loop" in hack[0] and "reward hacking" in hack[0]
    narrow = report.degeneration_notes(_two_decodings(distinct2=(0.9, 0.5, 0.9, 0.9)))
    assert len(narrow) == 1 and "PPO greedy answers have distinct-2 0.50, below 0.8x SFT's 0.90" in narrow[0]
    # in the report: the verdict right under the title, the notes before the table, both decodings as columns
    src = make_eval_folder(tmp_path / "eval", summary=_two_decodings(rep=(0.4, 0.5, 0.05, 0.0)),
                           meta={"config": {"do_sample": True, "temperature": 1.0}})
    text = report.write_report(src, src).read_text()
    lines = text.splitlines()
    assert lines[2].startswith("**Verdict: no gold difference") and "sampled answers +0.050" in lines[2]
    assert text.index("**Degenerate answers:**") < text.index("## Comparison")
    assert "| metric | SFT greedy | PPO greedy | SFT sampled | PPO sampled |" in text
    assert "| gold − SFT's, mean [95% paired bootstrap CI] | — | +0.200 [+0.100, +0.300] | — | +0.050 [-0.020, " \
           "+0.120] |" in text


def test_every_stage_s_training_curves_have_a_title_in_pipeline_order(tmp_path):
    from rlhf_tasks.evaluation import plots
    from rlhf_tasks.stages import STAGE_DEFS

    assert list(plots.STAGE_TITLES) == list(STAGE_DEFS)  # a DPO run's curves say "DPO", after SFT and the RM
    curves = {s: [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)] for s in ("dpo", "sft")}
    assert list(plots.make_plots(curves, [], ["sft", "ppo"], tmp_path)) == ["sft", "dpo"]
    _png_ok(tmp_path / "plots" / "dpo.png")
