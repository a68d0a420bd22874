"""`rlhf`: the command line users script against. Names and flags are stable (see README).

Every command's handler is here (`cmd_*`); each calls the library and prints. This is the top layer: it is the one
module of rlhf_tasks that imports flows/ (lazily, for `plan` and `run`), and nothing imports it back.

Exit codes: 0 success; 2 bad input (config, data, arguments) with one line naming the key/file/row;
1 a stage failed (the message says which stage and where its log is); 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import StageFailed, StoreError, UserError
from .stages import ALL_STAGES


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config file or preset name (tiny, smollm2-135m, opt-1.3b, ...); default: tiny")
    p.add_argument("--store", default=None, help="store URL (overrides store.url), e.g. ./rlhf-store or s3://b/p")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set ppo.kl_coef=0.05 (repeatable)")
    p.add_argument("--until", choices=ALL_STAGES, default="eval",
                   help="last stage to include (one of the config's method's stages)")


def load_selected_config(args):
    """The config named by --config/--set/--store (run and plan)."""
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "store", None):
        overrides.append(f"store.url={args.store}")
    return load_config(args.config, overrides)


def _store_from_args(args):
    from .config import load_config
    from .store import ArtifactStore

    if args.store:
        return ArtifactStore(args.store)
    return ArtifactStore.from_config(load_config(args.config).store)


def cmd_store(args) -> int:
    from .store import open_store_for_uri

    if args.store_cmd == "ls":
        store = _store_from_args(args).require_existing()  # a typo is an error, not a new empty store
        rows = []
        for kind, key, m in store.ls(args.kind):
            if m is None:
                rows.append((kind, key, "INCOMPLETE", "", "", ""))
                continue
            lineage = ", ".join(f"{n}={u.rsplit('/', 1)[-1][:10]}" for n, u in sorted(m.lineage.items()))
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
            rows.append((kind, key, "ok", _human(m.size), created, lineage))
        if args.json:
            print(json.dumps([dict(zip(("kind", "key", "status", "size", "created", "lineage"), r)) for r in rows]))
        else:
            print_table(("KIND", "KEY", "STATUS", "SIZE", "CREATED", "INPUTS"), rows)
        return 0
    if args.store_cmd == "verify":
        store, kind, key = open_store_for_uri(args.uri)
        m = store.require_existing().verify(kind, key, deep=True)
        print(f"ok {store.uri(kind, key)}: {len(m.files)} files, {_human(m.size)}, sha256 verified")
        return 0
    if args.store_cmd == "put":
        store = _store_from_args(args)
        uri = store.put_dir(args.path, args.kind, args.key)
        print(uri)
        return 0
    if args.store_cmd == "get":
        store, kind, key = open_store_for_uri(args.uri)
        path = store.require_existing().get(kind, key, deep=True)
        if args.dest:
            import shutil

            shutil.copytree(path, args.dest, dirs_exist_ok=True)
            path = args.dest
        print(path)
        return 0
    if args.store_cmd == "gc":
        store = _store_from_args(args).require_existing()
        removed = store.gc(min_age_s=args.min_age, unreferenced=args.unreferenced, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for u in removed:
            print(f"{verb} {u}")
        print(f"{verb} {len(removed)} artifact(s) and cache record(s)")
        return 0
    raise AssertionError(args.store_cmd)


# ---- rlhf plan / rlhf run ---------------------------------------------------------------------------------
_PREFERRED = ("win", "reward", "score", "kl", "acc", "loss", "rows", "steps")


def _say(line: str) -> None:
    print(line, flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def key_metrics(metrics: dict, limit: int = 4) -> str:
    """A few headline metrics: names mentioning win/reward/kl/acc/loss first, then the rest alphabetically."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    rank = lambda k: (next((i for i, w in enumerate(_PREFERRED) if w in k.lower()), len(_PREFERRED)), k)  # noqa: E731
    names = sorted(scalars, key=rank)[:limit]
    more = f" (+{len(scalars) - limit})" if len(scalars) > limit else ""
    return ", ".join(f"{k}={_fmt(scalars[k])}" for k in names) + more


def plan_from_args(args):
    """(config, store, plan) for run and plan: the config loaded once, every input checked
    (`preflight.checked_plan`), the stage keys computed once. Bad input raises a UserError here, before the store is
    written or anything starts."""
    from . import preflight

    cfg = load_selected_config(args)
    store, plans = preflight.checked_plan(cfg, args.until)
    return cfg, store, plans


def cmd_plan(args) -> int:
    from flows.stage_loop import run_name

    if getattr(args, "grid", None):
        return _plan_sweep(args)
    as_json = getattr(args, "json", False)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # keep stdout pure JSON
        cfg, store, plans = plan_from_args(args)
    if as_json:
        _say(json.dumps([{"stage": p.stage, "status": "cached" if p.cached else "will-run", "key": p.key,
                          "uri": p.uri, "reason": p.reason, "inputs": p.input_uris} for p in plans], indent=1))
        return 0
    from .stages import method_summary

    _say(f"plan for {run_name(cfg, args.until)} (store {store.url}):")
    _say(method_summary(cfg, plans))
    print_table(("STAGE", "STATUS", "KEY", "REASON"),
                [(p.stage, "cached" if p.cached else "will-run", p.key, p.reason) for p in plans])
    return 0


def cmd_run(args) -> int:
    from flows.cli_commands import run_with_prefect, run_without_prefect
    from flows.stage_loop import run_name

    cfg, store, plans = plan_from_args(args)
    name = run_name(cfg, args.until)
    todo = [p.stage for p in plans if not p.cached]
    _say(f"run {name}: {len(plans) - len(todo)} cached, {len(todo)} to run ({', '.join(todo) or 'nothing'}); "
         f"store {store.url}")
    t0 = time.monotonic()
    run = run_without_prefect if getattr(args, "no_prefect", False) else run_with_prefect
    result = run(cfg, store, plans, name, _say)
    wall = time.monotonic() - t0
    if result.record is not None:
        _print_stage_table(result.record)
        _write_summary(args.summary_json, result.record)
    e = result.error
    if e is not None:
        if isinstance(e, (StageFailed, UserError, StoreError, KeyboardInterrupt)):
            raise e
        # Anything else from the orchestration layer: report the failing stage as a StageFailed (exit 1).
        failed = [s for s, v in result.stages.items() if v.get("status") == "failed"]
        if failed:
            raise StageFailed(failed[0], f"{type(e).__name__}: {e}") from e
        raise e
    record = result.record
    n_ran = sum(1 for v in record["stages"].values() if v["status"] == "ran")
    _say(f"{record['flow_run_name']}: {n_ran} ran, {len(record['stages']) - n_ran} cached in {wall:.1f} s "
         f"(run id {record['run_id']})")
    return 0


# ---- rlhf sweep (and rlhf plan --grid) ---------------------------------------------------------------------
def sweep_from_args(args):
    """(base config, grid axes, store, sweep plan) of `--config/--set/--store/--grid/--until`: every variant
    checked and planned (rlhf_tasks/sweep.py); bad input raises a UserError naming the argument, before anything
    is written."""
    from .sweep import grid_labels, parse_grid_arg, plan_sweep

    base = load_selected_config(args)
    axes = [parse_grid_arg(item) for item in args.grid]
    store, sp = plan_sweep(base, axes, grid_labels(axes, args.grid), args.until)
    return base, axes, store, sp


def _plan_sweep(args) -> int:
    from flows.sweep_loop import sweep_name
    from .sweep import sweep_id

    as_json = getattr(args, "json", False)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # keep stdout pure JSON
        base, axes, store, sp = sweep_from_args(args)
    nodes = sp.nodes
    if as_json:
        _say(json.dumps([{"stage": p.stage, "variants": [sp.variants[i].name for i in sp.users(p.uri)],
                          "status": "cached" if p.cached else "will-run", "key": p.key, "uri": p.uri,
                          "reason": p.reason, "inputs": p.input_uris} for p in nodes], indent=1))
        return 0
    todo = sum(1 for p in nodes if not p.cached)
    _say(f"sweep plan for {sweep_name(base.experiment, sweep_id(base, axes, args.until))} (store {store.url}): "
         f"{len(sp.variants)} variants ({'; '.join(v.name for v in sp.variants)}), {len(nodes)} distinct stages, "
         f"{len(nodes) - todo} cached, {todo} to run")
    print_table(("STAGE", "VARIANTS", "STATUS", "KEY", "REASON"),
                [(p.stage, sp.variant_names(p.uri), "cached" if p.cached else "will-run", p.key, p.reason)
                 for p in nodes])
    return 0


def cmd_sweep(args) -> int:
    from flows.cli_commands import run_sweep_with_prefect, run_sweep_without_prefect
    from flows.sweep_loop import sweep_name
    from .evaluation.sweep_report import variant_rows
    from .sweep import sweep_id

    base, axes, store, sp = sweep_from_args(args)
    name = sweep_name(base.experiment, sweep_id(base, axes, args.until))
    nodes = sp.nodes
    todo = [p for p in nodes if not p.cached]
    _say(f"sweep {name}: {len(sp.variants)} variants, {len(nodes)} distinct stages: {len(nodes) - len(todo)} "
         f"cached, {len(todo)} to run; store {store.url}")
    t0 = time.monotonic()
    run = run_sweep_without_prefect if getattr(args, "no_prefect", False) else run_sweep_with_prefect
    record, error = run(base, store, sp, axes, args.until, name, _say)
    wall = time.monotonic() - t0
    if record is not None:
        _say("")
        rows = variant_rows(record)
        print_table(tuple(rows[0]), [tuple(r.values()) for r in rows])
        _write_summary(args.summary_json, record)
        if record.get("report"):
            _say(f"sweep report: {record['report']}")
    if error is not None:
        if isinstance(error, (StageFailed, UserError, StoreError, KeyboardInterrupt)):
            raise error
        raise StageFailed("sweep", f"{type(error).__name__}: {error}") from error
    stages = [v for var in record["variants"] for v in var["stages"].values()]
    ran = len({v["uri"] for v in stages if v["status"] == "ran"})
    _say(f"{name}: {len(sp.variants)} variants; {ran} stages ran, {len(nodes) - ran} cached in {wall:.1f} s "
         f"(run id {record['run_id']})")
    return 0


def _write_summary(path: str | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1, default=str))  # stages in pipeline order


def _print_stage_table(record: dict) -> None:
    rows = [(stage, v["status"], f"{v['wall_s']:.1f}", key_metrics(v.get("metrics") or {}), v["uri"])
            for stage, v in record["stages"].items()]
    if rows:
        _say("")
        print_table(("STAGE", "STATUS", "WALL_S", "METRICS", "ARTIFACT"), rows)


# ---- rlhf report / chat / generate ----------------------------------------------------------------------
def cmd_report(args) -> int:
    """Regenerate report.md + plots of an eval artifact (or a run's) and print its path."""
    from .evaluation import plots
    from .evaluation.report import resolve_eval_dir, write_report
    from .models import cache_root

    src = resolve_eval_dir(args.target, args.store)
    out = Path(args.out) if args.out else cache_root() / "reports" / plots.safe_name(src.name)
    print(write_report(src, out))
    return 0


def cmd_chat(args) -> int:
    import torch

    from .evaluation import chat
    from .evaluation.stage import pick_device

    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = pick_device()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tok, path = chat.load_policy(args.model, device)
    session = chat.ChatSession(model, tok, chat.sampling_config(args, tok), device)
    print(f"chatting with {path} on {device}. /reset clears the conversation, /quit (or Ctrl-D) exits.",
          file=sys.stderr, flush=True)
    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass
    return chat.chat_loop(session)


def cmd_generate(args) -> int:
    from .evaluation import chat
    from .evaluation.stage import pick_device

    prompts = chat.read_prompts(args.prompts)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    device = pick_device()
    model, tok, path = chat.load_policy(args.model, device)
    t0 = time.time()
    seed = args.seed if args.seed is not None else 0
    records = chat.generate_answers(model, tok, prompts, chat.sampling_config(args, tok), batch_size=args.batch_size,
                                    device=device, seed=seed)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out in ("-", None):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(f"generated {len(records)} answers with {path} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(header, rows) -> None:
    """Left-aligned columns separated by two spaces (the tables of `rlhf store ls`, `plan` and `run`)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    for r in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip(), flush=True)


class _Parser(argparse.ArgumentParser):
    """A usage error is bad input like any other: one line (`error: rlhf run: ...`), exit 2. --help is unchanged.
    Subcommand parsers are of the same class (argparse's default parser_class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="rlhf", description="DeepSpeed-Chat's RLHF recipe as cached Prefect flows.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _add_selection(p)
    p.add_argument("--summary-json", default=None, help="write the per-stage summary as JSON here")
    p.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect (same cache rule)")

    p = sub.add_parser("sweep", help="run every variant of a grid, sharing their common stages; compare them")
    _add_selection(p)
    _add_grid(p, required=True)
    p.add_argument("--summary-json", default=None, help="write the sweep record (every variant's stages) as JSON here")
    p.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect (same cache rule)")

    p = sub.add_parser("plan", help="per stage: cached or will-run, and why; runs nothing")
    _add_selection(p)
    _add_grid(p, required=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("store", help="inspect the artifact store")
    ssub = p.add_subparsers(dest="store_cmd", required=True)
    for name, hlp in (("ls", "list artifacts with lineage"), ("gc", "delete unfinished uploads and stale checkpoints"),
                      ("put", "upload a folder as an artifact")):
        q = ssub.add_parser(name, help=hlp)
        q.add_argument("--store", default=None, help="store URL (default: the tiny preset's store.url)")
        q.add_argument("--config", "-c", default=None, help="config whose store.url to use")
        if name == "ls":
            q.add_argument("--kind", default=None, help="only this kind (data, sft, ...)")
            q.add_argument("--json", action="store_true")
        if name == "gc":
            q.add_argument("--min-age", type=float, default=3600.0, help="seconds before an unfinished upload is stale")
            q.add_argument("--unreferenced", action="store_true", help="also delete artifacts nothing references")
            q.add_argument("--dry-run", action="store_true")
        if name == "put":
            q.add_argument("path")
            q.add_argument("kind")
            q.add_argument("key")
    q = ssub.add_parser("verify", help="re-hash an artifact against its manifest")
    q.add_argument("uri")
    q = ssub.add_parser("get", help="download (verified) and print the local folder")
    q.add_argument("uri")
    q.add_argument("--dest", default=None, help="copy the files here")

    p = sub.add_parser("report", help="regenerate the evaluation report from the store")
    p.add_argument("target", metavar="RUN_OR_URI", help="an eval artifact URI or a run id / run summary JSON")
    p.add_argument("--store", default=None)
    p.add_argument("--out", default=None, help="write the report folder here (default: print its path)")

    p = sub.add_parser("chat", help="interactive multi-turn chat with streamed tokens")
    p.add_argument("--model", required=True, help="store URI, local folder or hub name")
    _add_sampling(p)

    p = sub.add_parser("generate", help="answer a file of prompts in batch")
    p.add_argument("--model", required=True, help="store URI, local folder or hub name")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with a prompt field")
    p.add_argument("--out", default="-", help="JSONL output (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    _add_sampling(p)
    return ap


def _add_grid(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--grid", action="append", default=[] if not required else None, required=required,
                   metavar="KEY=V1,V2", help="a sweep axis, e.g. --grid ppo.kl_coef=0.05,0.1,0.2 (repeatable: one "
                   "variant per combination)" + ("" if required else "; shows the sweep's plan"))


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "plan": cmd_plan, "store": cmd_store, "report": cmd_report, "chat": cmd_chat,
            "generate": cmd_generate}


def dispatch(args) -> int:
    return COMMANDS[args.cmd](args)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGTERM stops a run like Ctrl-C: jobs and the temporary API go down, "interrupted", exit 130. (Inside a flow
    # Prefect's handler takes SIGTERM first, marks the run crashed, then re-sends it to this one.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed): return it like any other outcome
        return int(e.code or 0)
    try:
        return dispatch(args)
    except (UserError, StoreError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine, not the input: a full disk, an unreachable store, a permission
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
