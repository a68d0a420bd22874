"""Evaluation stage: compare the SFT policy with the method's (PPO, GRPO, RLOO or DPO; and the EMA actor when kept) on
held-out prompts.

Inputs (spec.inputs): `data`, `sft`, `reward` and the method's policy artifact URIs (config.methods.eval_inputs);
the method's policy takes the `ppo` slot of the summary keys (gold_ppo, win_rate_gold, ...), and the report names
it by `meta.method`. For each policy, greedy and seeded sampled
answers to the data artifact's ppo/eval prompts are scored by the reward model, where a row names one by the gold
scorer, and by `eval.reward_fn` when set. The summary has, per decoding, mean/std of each score, PPO-vs-SFT win rates and the paired gold
difference with its bootstrap interval and sign test, KL of the PPO policy to the reference (the SFT policy) on
its own answers, response length, EOS rate, distinct-1/2 and repetition rate (collapse and reward hacking show
there), and the reward model's pairwise accuracy on the held-out reward/eval pairs. The config's decoding
(`eval.do_sample`) is the primary one: its keys are unprefixed, the other's (and its own) carry `greedy/` or
`sampled/`. Output artifact: report.md, metrics.json, samples.json, curves.json, plots/*.png.

Nothing here imports Prefect; `evaluate()` is usable on local folders without a spec.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import models
from ..config import EvalConfig
from ..data.artifact import load_phase
from ..errors import DataError, StoreError
from ..stages import commit_stage_output
from . import generation, metrics

POLICIES = ("sft", "ppo", "ema")  # display order; ema only when the PPO artifact has one


@dataclass
class PolicyResult:
    """Per-prompt outputs of one policy."""

    name: str
    response_ids: list[list[int]]
    responses: list[str]
    rm: list[float]
    gold: list[float | None]
    eos: list[bool]
    kl: list[float] | None = None  # to the reference, sampled-token (k1) estimate (None for the reference)
    kl_exact: list[float] | None = None  # to the reference, exact per-token KL summed over the answer
    fn: list[float] | None = None  # eval.reward_fn's score of each answer (None: no reward function)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


@dataclass
class EvalInputs:
    """Local folders of everything evaluation reads."""

    data_dir: Path
    sft_dir: Path
    reward_dir: Path
    ppo_dir: Path | None = None  # artifact root (actor/ and maybe ema/ inside)

    def policy_dirs(self) -> dict[str, Path]:
        dirs = {"sft": self.sft_dir}
        if self.ppo_dir is not None:
            dirs["ppo"] = policy_folder(self.ppo_dir)
            if (self.ppo_dir / "ema" / "config.json").exists():
                dirs["ema"] = self.ppo_dir / "ema"
        return dirs


def policy_folder(path: Path) -> Path:
    """The HF folder of a policy artifact: a PPO artifact's `actor/`, else the folder itself."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "actor" / "config.json").exists():
        return path / "actor"
    return path


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def select_rows(n: int, k: int, seed: int) -> list[int]:
    """k row indices out of n, chosen by `seed`, in ascending order (all rows when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a is tok_b or (len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab())


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def held_out_prompts(data_dir: Path, ecfg: EvalConfig):
    """The evaluated prompts: `num_prompts` rows of the data artifact's ppo/eval split chosen by `seed`.
    -> (rows, prompt token ids, raw prompts, formatted prompt texts, gold scorer names)."""
    prompts = load_phase(data_dir, "ppo", "eval")
    if len(prompts) == 0:
        raise DataError(f"{data_dir}: ppo/eval split is empty: no held-out prompts to evaluate")
    rows = prompts.select(select_rows(len(prompts), ecfg.num_prompts, ecfg.seed))
    raw_prompts = list(rows["prompt"])
    prompt_texts = list(rows["prompt_text"]) if "prompt_text" in rows.column_names else raw_prompts
    gold_names = list(rows["gold"]) if "gold" in rows.column_names else [None] * len(rows)
    return rows, [list(p) for p in rows["prompt_ids"]], raw_prompts, prompt_texts, gold_names


def decodings(ecfg: EvalConfig) -> tuple[str, str]:
    """Both decodings, the config's own (`do_sample`) first: it is the primary one (unprefixed summary keys, the
    sample table, the verdict)."""
    return ("sampled", "greedy") if ecfg.do_sample else ("greedy", "sampled")


def evaluate(inputs: EvalInputs, ecfg: EvalConfig, device: torch.device | None = None,
             log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Run the comparison under greedy and sampled decoding. Returns (flat summary of scalars, one sample record
    per prompt)."""
    device = device or pick_device()
    torch.manual_seed(ecfg.seed)
    rows, prompt_ids, raw_prompts, prompt_texts, gold_names = held_out_prompts(inputs.data_dir, ecfg)

    rm_tok = models.load_tokenizer(str(inputs.reward_dir), padding_side="right")
    rm = models.load_score_model(str(inputs.reward_dir), dropout=0.0).to(device)
    rm.eval()
    score_fn = reward_fn_scorer(ecfg, rows, raw_prompts)

    results: dict[str, dict[str, PolicyResult]] = {d: {} for d in decodings(ecfg)}
    reference = None
    for name, folder in inputs.policy_dirs().items():
        t0 = time.time()
        tok = models.load_tokenizer(str(folder), padding_side="left")
        model = models.load_causal_lm(str(folder), dropout=0.0).to(device)
        model.eval()
        for decoding in results:
            sample = decoding == "sampled"
            gen_cfg = generation.generation_config(tok, max_new_tokens=ecfg.max_new_tokens, do_sample=sample,
                                                   temperature=ecfg.temperature, top_p=ecfg.top_p, top_k=ecfg.top_k)
            resp = generation.generate(model, tok, prompt_ids, batch_size=ecfg.batch_size, device=device,
                                       gen_cfg=gen_cfg, seed=ecfg.seed)
            texts = [tok.decode(r, skip_special_tokens=True).strip() for r in resp]
            eos = [bool(r) and r[-1] == tok.eos_token_id for r in resp]
            rm_scores = _rm_scores(rm, rm_tok, tok, prompt_ids, prompt_texts, resp, texts, ecfg.batch_size, device)
            gold = gold_scores(gold_names, raw_prompts, texts)
            kl = kl_exact = None
            if reference is not None:
                kl, kl_exact = generation.kl_to_reference(
                    model, reference, prompt_ids, resp, pad_id=tok.pad_token_id, batch_size=ecfg.batch_size,
                    device=device, temperature=ecfg.temperature if sample else 1.0)
            results[decoding][name] = PolicyResult(name, resp, texts, rm_scores, gold, eos, kl, kl_exact,
                                                   score_fn(texts) if score_fn is not None else None)
            log(f"eval: {name} ({decoding}): {len(resp)} answers, rm {metrics.mean_std(rm_scores)[0]:.4f}"
                + (f", kl {metrics.mean_std(kl)[0]:.4f}" if kl is not None else ""))
        log(f"eval: {name} done ({time.time() - t0:.1f}s)")
        if name == "sft":
            reference = model  # the SFT policy is PPO's reference
        else:
            del model

    primary, secondary = decodings(ecfg)
    summary = summarize(results[primary])
    for decoding, by_policy in results.items():
        summary.update({f"{decoding}/{k}": v for k, v in summarize(by_policy).items()})
    summary.update(_rm_accuracy(inputs.data_dir, rm, rm_tok, ecfg, device))
    summary["num_prompts"] = len(rows)
    samples = sample_records(rows, results[primary], {secondary: results[secondary]})
    return summary, samples


def _rm_scores(rm, rm_tok, pol_tok, prompt_ids, prompt_texts, resp, texts, batch_size, device) -> list[float]:
    """Score prompt+response with the reward model: on the policy's tokens when the vocabularies match, else
    re-tokenized from text with the RM's tokenizer (EOS appended where the policy ended with EOS)."""
    if same_vocab(rm_tok, pol_tok):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, resp)]
    else:
        seqs = []
        for ptxt, r, txt in zip(prompt_texts, resp, texts):
            ids = rm_tok(ptxt + " " + txt, add_special_tokens=False)["input_ids"]
            if r and r[-1] == pol_tok.eos_token_id and rm_tok.eos_token_id is not None:
                ids.append(rm_tok.eos_token_id)
            seqs.append(ids)
    return generation.score(rm, seqs, pad_id=rm_tok.pad_token_id, batch_size=batch_size, device=device)


def reward_fn_scorer(ecfg: EvalConfig, rows, prompts: list[str]) -> Callable[[list[str]], list[float]] | None:
    """`eval.reward_fn` as answers -> scores for the evaluated rows (their raw prompts and row fields), or None."""
    if not ecfg.reward_fn:
        return None
    from ..reward_fn import ROW_FIELDS, load_reward_fn

    fn = load_reward_fn(ecfg.reward_fn, "eval.reward_fn")
    cols = {k: list(rows[k]) for k in ROW_FIELDS if k in rows.column_names}
    fields = [{k: v[i] for k, v in cols.items()} for i in range(len(prompts))]
    return lambda texts: [fn(p, t, f) for p, t, f in zip(prompts, texts, fields)]


_GOLD_CACHE: dict[str, Callable[[str, str], float]] = {}


def gold_scores(names: list[str | None], prompts: list[str], responses: list[str]) -> list[float | None]:
    """Each response's score under its row's gold scorer (None where the row names none)."""
    out: list[float | None] = []
    for name, p, r in zip(names, prompts, responses):
        if not name:
            out.append(None)
            continue
        if name not in _GOLD_CACHE:
            from ..data.gold import get_gold_scorer

            _GOLD_CACHE[name] = get_gold_scorer(name)
        out.append(float(_GOLD_CACHE[name](p, r)))
    return out


def summarize(results: dict[str, PolicyResult]) -> dict[str, float]:
    """Flat summary of one decoding: per policy rm/gold mean+std, length, EOS rate, answer diversity, KL; each
    non-SFT policy's win rates and paired gold difference vs SFT.
    Keys: rm_<p>, rm_<p>_std, fn_<p>, fn_<p>_std (eval.reward_fn), gold_<p>, gold_<p>_std, len_<p>, eos_rate_<p>, distinct1_<p>, distinct2_<p>,
    repetition_<p>, kl_<p>_ref (+_std; the k1 estimate on the policy's own answers), kl_<p>_ref_exact (exact
    per-token KL summed over the answer), win_rate_rm[_<p>], win_rate_fn[_<p>], win_rate_gold[_<p>], gold_gain[_<p>] (mean paired
    gold difference vs SFT) with gold_gain[_<p>]_ci_low/_ci_high (95% paired bootstrap interval) and
    gold_sign_p[_<p>] (two-sided sign test); the suffix is omitted for ppo. Values that cannot be computed are
    left out."""
    s: dict[str, float] = {}
    for name, r in results.items():
        s[f"distinct1_{name}"] = metrics.distinct_n(r.responses, 1)
        s[f"distinct2_{name}"] = metrics.distinct_n(r.responses, 2)
        s[f"repetition_{name}"] = metrics.repetition_rate(r.responses)
        s[f"rm_{name}"], s[f"rm_{name}_std"] = metrics.mean_std(r.rm)
        if r.fn is not None:
            s[f"fn_{name}"], s[f"fn_{name}_std"] = metrics.mean_std(r.fn)
        gold = [g for g in r.gold if g is not None]
        if gold:
            s[f"gold_{name}"], s[f"gold_{name}_std"] = metrics.mean_std(gold)
        s[f"len_{name}"] = metrics.mean_std(r.lengths)[0]
        s[f"eos_rate_{name}"] = metrics.rate(r.eos)
        if r.kl is not None:
            s[f"kl_{name}_ref"], s[f"kl_{name}_ref_std"] = metrics.mean_std(r.kl)
        if r.kl_exact is not None:
            s[f"kl_{name}_ref_exact"] = metrics.mean_std(r.kl_exact)[0]
    base = results.get("sft")
    for name, r in results.items():
        if base is None or name == "sft":
            continue
        suffix = "" if name == "ppo" else f"_{name}"
        s[f"win_rate_rm{suffix}"] = metrics.win_rate(r.rm, base.rm)
        if r.fn is not None and base.fn is not None:
            s[f"win_rate_fn{suffix}"] = metrics.win_rate(r.fn, base.fn)
        pairs = [(a, b) for a, b in zip(r.gold, base.gold) if a is not None and b is not None]
        if pairs:
            ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
            s[f"win_rate_gold{suffix}"] = metrics.win_rate(ours, theirs)
            gain = f"gold_gain{suffix}"
            s[gain], s[f"{gain}_ci_low"], s[f"{gain}_ci_high"] = metrics.paired_bootstrap_ci(ours, theirs)
            s[f"gold_sign_p{suffix}"] = metrics.sign_test_p(ours, theirs)
    return {k: float(v) for k, v in s.items() if _finite(v)}


@torch.no_grad()
def _rm_accuracy(data_dir: Path, rm, rm_tok, ecfg: EvalConfig, device) -> dict[str, float]:
    """Pairwise accuracy of the reward model on held-out reward/eval pairs (prompt+chosen vs prompt+rejected)."""
    try:
        pairs = load_phase(data_dir, "reward", "eval")
    except (FileNotFoundError, DataError, StoreError):  # no reward/eval split in this data artifact
        return {}
    if len(pairs) == 0:
        return {}
    pairs = pairs.select(select_rows(len(pairs), ecfg.num_pairs, ecfg.seed))
    chosen = [list(p) + list(c) for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"])]
    rejected = [list(p) + list(r) for p, r in zip(pairs["prompt_ids"], pairs["rejected_ids"])]
    kw = dict(pad_id=rm_tok.pad_token_id, batch_size=ecfg.batch_size, device=device)
    c, r = generation.score(rm, chosen, **kw), generation.score(rm, rejected, **kw)
    margin = metrics.mean_std([a - b for a, b in zip(c, r)])[0]
    return {"rm_accuracy": metrics.pairwise_accuracy(c, r), "rm_margin": margin, "num_pairs": float(len(c))}


def _answer_record(r: PolicyResult, i: int) -> dict:
    rec = {"response": r.responses[i], "rm": r.rm[i], "gold": r.gold[i], "length": r.lengths[i], "eos": r.eos[i]}
    if r.fn is not None:
        rec["fn"] = r.fn[i]
    if r.kl is not None:
        rec["kl"] = r.kl[i]
    if r.kl_exact is not None:
        rec["kl_exact"] = r.kl_exact[i]
    return rec


def sample_records(rows, results: dict[str, PolicyResult],
                   other: dict[str, dict[str, PolicyResult]] | None = None) -> list[dict]:
    """One JSON record per prompt with every policy's answer and scores; `other` ({decoding: results}) adds each
    policy's answer under that decoding as rec[policy][decoding]."""
    cols = rows.column_names
    out = []
    for i in range(len(rows)):
        rec: dict[str, Any] = {
            "index": i,
            "source": rows["source"][i] if "source" in cols else None,
            "row": int(rows["row"][i]) if "row" in cols else None,
            "prompt": rows["prompt"][i],
            "gold_scorer": rows["gold"][i] if "gold" in cols else None,
        }
        for name, r in results.items():
            rec[name] = _answer_record(r, i)
            for decoding, by_policy in (other or {}).items():
                rec[name][decoding] = _answer_record(by_policy[name], i)
        out.append(rec)
    return out


# ---- artifact ---------------------------------------------------------------------------------------------
def read_upstream(dirs: dict[str, Path]) -> dict[str, dict]:
    """metrics.json of each upstream artifact (missing or unreadable ones are skipped)."""
    out = {}
    for stage, d in dirs.items():
        p = Path(d) / "metrics.json"
        try:
            out[stage] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return out


def write_outputs(out_dir: Path, summary: dict, samples: list[dict], upstream: dict[str, dict],
                  meta: dict, num_samples_in_report: int) -> None:
    """Write metrics.json, samples.json, curves.json and the report (report.md + plots/) into `out_dir`."""
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {s: m.get("history", []) for s, m in upstream.items() if isinstance(m.get("history"), list)}
    upstream_summaries = {s: m.get("summary", {}) for s, m in upstream.items()}
    doc = {"summary": summary, "samples": samples[:num_samples_in_report], "meta": meta,
           "upstream": upstream_summaries}
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=1, sort_keys=True))
    (out_dir / "curves.json").write_text(json.dumps(curves, indent=1, sort_keys=True))
    write_report(out_dir, out_dir)


def run(spec) -> str:
    """Stage entry point (single process): evaluate, write the report, commit the artifact."""
    cfg = spec.pipeline_config()
    ecfg = cfg.eval
    store = spec.open_store()
    dirs = {name: store.get_uri(uri) for name, uri in spec.inputs.items()}  # the plan's: stages.stage_inputs
    missing = [n for n in ("data", "sft", "reward") if n not in dirs]
    if missing:
        raise DataError(f"eval stage spec has no input(s) {', '.join(missing)}")
    # the method's policy (ppo, grpo, rloo: the one input that is not data, SFT or the RM) in the step-3 slot
    policy = next((dirs[n] for n in spec.inputs if n not in ("data", "sft", "reward")), None)
    inputs = EvalInputs(dirs["data"], dirs["sft"], dirs["reward"], policy)
    device = pick_device(cfg.execution.device)
    print(f"eval: device {device}, {ecfg.num_prompts} prompts, policies {', '.join(inputs.policy_dirs())}",
          flush=True)
    t0 = time.time()
    summary, samples = evaluate(inputs, ecfg, device, log=lambda s: print(s, flush=True))
    summary["eval_seconds"] = round(time.time() - t0, 3)
    meta = {"experiment": cfg.experiment, "method": cfg.method, "inputs": dict(spec.inputs),
            "output_uri": spec.output_uri, "config": ecfg.model_dump(mode="json")}
    scratch = Path(spec.run_dir) if spec.run_dir else Path(tempfile.mkdtemp(prefix="rlhf-eval-"))
    out_dir = scratch / "eval-artifact"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    write_outputs(out_dir, summary, samples, read_upstream(dirs), meta, ecfg.num_samples_in_report)
    uri = commit_stage_output(spec, out_dir, summary)
    print(f"eval: committed {uri}", flush=True)
    return uri
