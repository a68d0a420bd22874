"""Does RLHF work on a real model? The whole pipeline on SmolLM2-135M-Instruct and the constraints task, on CPU
(a benchmark, not a test; `make bench-quality`).

Runs `rlhf run --config smollm2-135m` (data, SFT, reward model, PPO, evaluation) into a fresh store, scores the
untrained model's greedy answers on the same held-out prompts, and prints one table against issue 12's targets:
    PPO greedy gold >= SFT greedy gold + 0.10          (0-1 scale: the share of the prompt's rules met)
    PPO sampled gold > SFT sampled gold                (the same direction on sampled answers)
    KL(PPO || SFT) on PPO's sampled answers in 0.5-10 nats per answer
    distinct-2 of PPO's greedy answers >= 0.8 x SFT's  (no collapse onto a few answers)
    reward model's held-out pairwise accuracy >= 0.9
    whole pipeline <= 45 minutes
Exit status 0 when every target is met, 1 otherwise.

    python benchmarks/quality.py                         # the full run (~45 minutes on a 2-core CPU)
    python benchmarks/quality.py --set ppo.total_steps=3 --set sft.max_steps=4 --set reward.max_steps=4 \\
        --set eval.num_prompts=8                         # a smoke run of the same code path
Also: --store DIR (default: a new temporary folder), --json PATH (the numbers), --no-prefect, --config PRESET
(e.g. `tiny`, to try the script itself in a minute; the targets are set for SmolLM2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "smollm2-135m"
MAX_WALL_S = 45 * 60


def targets(s: dict, wall_s: float) -> list[tuple[str, str, bool]]:
    """(target, measured value, met?) for each of issue 12's targets, from an eval summary and the wall time."""
    def get(key: str) -> float:
        return float(s.get(key, math.nan))

    g_sft, g_ppo = get("greedy/gold_sft"), get("greedy/gold_ppo")
    s_sft, s_ppo = get("sampled/gold_sft"), get("sampled/gold_ppo")
    kl, d_sft, d_ppo, acc = get("sampled/kl_ppo_ref_exact"), get("greedy/distinct2_sft"), \
        get("greedy/distinct2_ppo"), get("rm_accuracy")
    return [
        ("PPO greedy gold >= SFT greedy gold + 0.10", f"{g_ppo:.3f} vs {g_sft:.3f} ({g_ppo - g_sft:+.3f})",
         g_ppo >= g_sft + 0.10),
        ("PPO sampled gold > SFT sampled gold", f"{s_ppo:.3f} vs {s_sft:.3f} ({s_ppo - s_sft:+.3f})", s_ppo > s_sft),
        ("KL(PPO || SFT) in 0.5-10 nats/answer (sampled)", f"{kl:.2f}", 0.5 <= kl <= 10),
        ("PPO greedy distinct-2 >= 0.8 x SFT's", f"{d_ppo:.3f} vs {d_sft:.3f}", d_ppo >= 0.8 * d_sft),
        ("reward-model held-out accuracy >= 0.9", f"{acc:.3f}", acc >= 0.9),
        ("whole pipeline <= 45 min", f"{wall_s / 60:.1f} min", wall_s <= MAX_WALL_S),
    ]


def base_model_gold(data_dir: Path, ecfg, model_ref: str) -> float:
    """Mean gold of the untrained model's greedy answers to the evaluation's held-out prompts."""
    import torch

    from rlhf_tasks import models
    from rlhf_tasks.evaluation import generation, stage

    rows, prompt_ids, raw_prompts, _, gold_names = stage.held_out_prompts(data_dir, ecfg)
    path = models.resolve_model(model_ref)
    tok = models.load_tokenizer(path, padding_side="left")
    model = models.load_causal_lm(path, dropout=0.0)
    gen_cfg = generation.generation_config(tok, max_new_tokens=ecfg.max_new_tokens, do_sample=False)
    resp = generation.generate(model, tok, prompt_ids, batch_size=ecfg.batch_size, device=torch.device("cpu"),
                               gen_cfg=gen_cfg)
    gold = stage.gold_scores(gold_names, raw_prompts, [tok.decode(r, skip_special_tokens=True).strip()
                                                       for r in resp])
    scored = [g for g in gold if g is not None]
    return sum(scored) / len(scored) if scored else math.nan


def print_table(s: dict, base_gold: float, stage_walls: dict, wall_s: float) -> list[tuple[str, str, bool]]:
    from rlhf_tasks.evaluation.report import verdict

    print()
    print(verdict(s, "greedy").replace("**", ""))
    print()
    print(f"{'':34} {'untrained':>10} {'SFT':>10} {'PPO':>10}")
    for dec in ("greedy", "sampled"):
        base = f"{base_gold:10.3f}" if dec == "greedy" else f"{'':>10}"
        print(f"{'gold, ' + dec:34} {base} {s.get(f'{dec}/gold_sft', math.nan):10.3f} "
              f"{s.get(f'{dec}/gold_ppo', math.nan):10.3f}")
        for key, label in (("rm", "reward-model score"), ("distinct2", "distinct-2"),
                           ("repetition", "repetition rate"), ("len", "length, tokens"), ("eos_rate", "EOS rate")):
            print(f"{label + ', ' + dec:34} {'':>10} {s.get(f'{dec}/{key}_sft', math.nan):10.3f} "
                  f"{s.get(f'{dec}/{key}_ppo', math.nan):10.3f}")
        print(f"{'KL to SFT (exact), ' + dec:34} {'':>10} {'':>10} {s.get(f'{dec}/kl_ppo_ref_exact', math.nan):10.3f}")
    print(f"{'reward-model accuracy (held out)':34} {s.get('rm_accuracy', math.nan):10.3f}")
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_walls.items()) + f"; total {wall_s:.0f} s")
    print()
    result = targets(s, wall_s)
    for name, value, ok in result:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {value}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=PRESET, help="preset or config file (the targets are set for the default)")
    ap.add_argument("--store", help="store folder (default: a new temporary folder, so nothing is cached)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    ap.add_argument("--json", help="write the summary, targets and wall times here")
    args = ap.parse_args(argv)

    from rlhf_tasks.cli import main as rlhf
    from rlhf_tasks.config import load_config
    from rlhf_tasks.evaluation.report import resolve_eval_dir

    store = args.store or tempfile.mkdtemp(prefix="rlhf-quality-")
    record_path = Path(store) / "quality-run.json"
    cmd = ["run", "--config", args.config, "--store", store, "--summary-json", str(record_path)]
    cmd += [x for kv in args.set for x in ("--set", kv)] + (["--no-prefect"] if args.no_prefect else [])
    print("rlhf " + " ".join(cmd), flush=True)
    t0 = time.time()
    rc = rlhf(cmd)
    wall_s = time.time() - t0
    if rc != 0:
        print(f"rlhf run failed (exit {rc})", file=sys.stderr)
        return 1
    record = json.loads(record_path.read_text())
    eval_dir = resolve_eval_dir(str(record_path))
    summary = json.loads((eval_dir / "metrics.json").read_text())["summary"]
    cfg = load_config(args.config, overrides=args.set)
    base_gold = base_model_gold(Path(record["stages"]["data"]["uri"].removeprefix("file://")), cfg.eval,
                                cfg.models.actor)
    walls = {k: float(v.get("wall_s", 0.0)) for k, v in record["stages"].items()}
    result = print_table(summary, base_gold, walls, wall_s)
    print(f"report: {eval_dir / 'report.md'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "untrained_greedy_gold": base_gold,
                                               "stage_wall_s": walls, "wall_s": wall_s,
                                               "targets": [{"target": n, "value": v, "met": ok}
                                                           for n, v, ok in result]}, indent=1))
    return 0 if all(ok for _, _, ok in result) else 1


if __name__ == "__main__":
    sys.exit(main())
