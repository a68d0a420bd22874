"""`rlhf`: the command line users script against. Names and flags are stable (see README).

Exit codes: 0 success; 2 bad input (config, data, arguments) with one line naming the key/file/row;
1 a stage failed (the message says which stage and where its log is).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import StageFailed, StoreError, UserError

STAGE_CHOICES = ["data", "sft", "reward", "ppo", "eval"]


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config file or preset name (tiny, smollm2-135m, opt-1.3b, ...); default: tiny")
    p.add_argument("--store", default=None, help="store URL (overrides store.url), e.g. ./rlhf-store or s3://b/p")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set ppo.kl_coef=0.05 (repeatable)")
    p.add_argument("--until", choices=STAGE_CHOICES, default="eval", help="last stage to include")


def load_selected_config(args):
    """The config named by --config/--set/--store (shared by run, plan and the Prefect form)."""
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
        store = _store_from_args(args)
        rows = []
        for kind, key, m in store.ls(args.kind):
            if m is None:
                rows.append((kind, key, "INCOMPLETE", "", "", ""))
                continue
            lineage = ", ".join(f"{n}={u.rsplit('/', 1)[-1][:10]}" for n, u in sorted(m.lineage.items()))
            created = __import__("time").strftime("%Y-%m-%d %H:%M", __import__("time").localtime(m.created))
            rows.append((kind, key, "ok", _human(m.size), created, lineage))
        if args.json:
            print(json.dumps([dict(zip(("kind", "key", "status", "size", "created", "lineage"), r)) for r in rows]))
        else:
            print_table(("KIND", "KEY", "STATUS", "SIZE", "CREATED", "INPUTS"), rows)
        return 0
    if args.store_cmd == "verify":
        store, kind, key = open_store_for_uri(args.uri)
        m = store.verify(kind, key, deep=True)
        print(f"ok {store.uri(kind, key)}: {len(m.files)} files, {_human(m.size)}, sha256 verified")
        return 0
    if args.store_cmd == "put":
        store = _store_from_args(args)
        uri = store.put_dir(args.path, args.kind, args.key)
        print(uri)
        return 0
    if args.store_cmd == "get":
        store, kind, key = open_store_for_uri(args.uri)
        path = store.get(kind, key, deep=True)
        if args.dest:
            import shutil

            shutil.copytree(path, args.dest, dirs_exist_ok=True)
            path = args.dest
        print(path)
        return 0
    if args.store_cmd == "gc":
        store = _store_from_args(args)
        removed = store.gc(min_age_s=args.min_age, unreferenced=args.unreferenced, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for u in removed:
            print(f"{verb} {u}")
        print(f"{verb} {len(removed)} artifact(s)")
        return 0
    raise AssertionError(args.store_cmd)


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhf", description="DeepSpeed-Chat's RLHF recipe as cached Prefect flows.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _add_selection(p)
    p.add_argument("--summary-json", default=None, help="write the per-stage summary as JSON here")
    p.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect (same cache rule)")

    p = sub.add_parser("plan", help="per stage: cached or will-run, and why; runs nothing")
    _add_selection(p)
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


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def dispatch(args) -> int:
    if args.cmd == "store":
        return cmd_store(args)
    if args.cmd in ("run", "plan"):
        load_selected_config(args)  # bad input fails here, before Prefect or any job starts
        from flows import cli_commands

        return cli_commands.cmd_run(args) if args.cmd == "run" else cli_commands.cmd_plan(args)
    if args.cmd == "report":
        from .evaluation.report import cmd_report

        return cmd_report(args)
    if args.cmd in ("chat", "generate"):
        from .evaluation import chat

        return chat.cmd_chat(args) if args.cmd == "chat" else chat.cmd_generate(args)
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
