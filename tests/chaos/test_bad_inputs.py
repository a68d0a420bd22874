"""The bad-input corpus: every case in bad_inputs/*.yaml is one bad input to `rlhf` (argv + the files it names)
and the substring its error must contain. For each case: exit code 2, exactly one line on stderr that names the
file/row/field, no traceback anywhere, and the store (and the case's folder, where relative paths and the runs
folder point) byte for byte unchanged. Most cases drive `rlhf_tasks.cli.main(argv)` in this process; the ones
marked `real_cli: true` run the installed entry point as a subprocess.

A case file:
    argv: [run, --set, "models.actor=/nonexistent/model"]   # {case}: the case's folder, {store}: its store
    files: {config.yaml: "...", data/x.jsonl: [...]}        # text, or a list of parts: text, {text, times}, {base64}
    store: false                                            # the case sets --store itself (default: true)
    real_cli: true                                          # run `python -m rlhf_tasks.cli` in a subprocess
    expect: "models.actor: /nonexistent/model: no such folder"
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_tasks.cli import main

pytestmark = pytest.mark.chaos
CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
PIPELINE_COMMANDS = ("run", "plan")


def _render(spec, subst: dict[str, str]) -> bytes:
    parts = spec if isinstance(spec, list) else [spec]
    out = b""
    for part in parts:
        if isinstance(part, str):
            out += _fill(part, subst).encode()
        elif "base64" in part:
            out += base64.b64decode(part["base64"])
        else:
            out += _fill(part["text"], subst).encode() * int(part.get("times", 1))
    return out


def _fill(text: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        text = text.replace("{" + k + "}", v)
    return text


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: (kind, size, sha256) for files, ("dir",) for folders."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() \
            else ("dir",)
    return out


def bytes_written(before: dict, after: dict) -> int:
    """Bytes in files that are new or changed, plus one per new folder or vanished path (so nothing goes unseen)."""
    n = 0
    for rel, entry in after.items():
        if before.get(rel) != entry:
            n += entry[1] if entry[0] == "file" else 1
    return n + sum(1 for rel in before if rel not in after)


def prepare(case: dict, folder: Path) -> list[str]:
    """Write the case's files into `folder` (with a store holding one file) and return its argv."""
    store = folder / "store"
    store.mkdir(parents=True)
    (store / "KEEP.txt").write_text("the store before the command\n")
    subst = {"case": str(folder), "store": str(store)}
    for rel, spec in (case.get("files") or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_render(spec, subst))
    argv = [_fill(str(a), subst) for a in case["argv"]]
    if argv[0] in PIPELINE_COMMANDS:
        argv += ["--set", f"execution.runs_dir={folder / 'runs'}"]
        if case.get("store", True):
            argv += ["--store", str(store)]
    return argv


def run_case(path: Path, folder: Path, capsys, monkeypatch) -> dict:
    case = yaml.safe_load(path.read_text())
    folder.mkdir(parents=True)
    argv = prepare(case, folder)
    expect = _fill(case["expect"], {"case": str(folder), "store": str(folder / "store")})
    before = snapshot(folder)
    monkeypatch.chdir(folder)  # relative paths (and a default ./rlhf-store) land inside the snapshot
    if case.get("real_cli"):
        r = subprocess.run([sys.executable, "-m", "rlhf_tasks.cli", *argv], capture_output=True, text=True,
                           timeout=300, cwd=folder, env=dict(os.environ))
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    return {"case": path.stem, "rc": rc, "lines": lines, "expect": expect,
            "traceback": "Traceback" in out + err, "written": bytes_written(before, snapshot(folder)),
            "clear": rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]}


def test_snapshot_sees_every_write(tmp_path):
    (tmp_path / "a").write_text("x")
    before = snapshot(tmp_path)
    assert bytes_written(before, snapshot(tmp_path)) == 0
    (tmp_path / "a").write_text("y")  # same size, other bytes
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text("{}")
    assert bytes_written(before, snapshot(tmp_path)) == 1 + 1 + 2


def test_corpus_is_big_enough_and_well_formed():
    assert len(CASES) >= 30
    for path in CASES:
        case = yaml.safe_load(path.read_text())
        assert set(case) <= {"argv", "files", "store", "real_cli", "expect"}, path.name
        assert case["argv"] and case["expect"], path.name
    assert sum(1 for p in CASES if yaml.safe_load(p.read_text()).get("real_cli")) >= 3


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    results = [run_case(p, tmp_path / p.stem, capsys, monkeypatch) for p in CASES]
    clear = sum(r["clear"] for r in results)
    tracebacks = sum(r["traceback"] for r in results)
    written = sum(r["written"] for r in results)
    with capsys.disabled():
        print(f"\n{len(results)} bad inputs tried, {clear} clear errors, {tracebacks} tracebacks, "
              f"{written} bytes written")
    bad = [r for r in results if not r["clear"] or r["traceback"] or r["written"]]
    assert bad == []


def test_a_json_array_in_a_json_file_is_read_as_rows(tmp_path, capsys, monkeypatch):
    """The other side of `data-jsonl-holds-a-json-array`: a `.json` file holding a list of objects is a dataset."""
    import json

    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": "no"} for i in range(200)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "config.yaml").write_text(f"data:\n  sources:\n    - path: {tmp_path / 'rows.json'}\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["plan", "--config", str(tmp_path / "config.yaml"), "--store", str(tmp_path / "store")]) == 0
    assert "rows: 200 rows read, 200 valid" in capsys.readouterr().out
