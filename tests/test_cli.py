"""The `rlhf` command: help, store round trip (local and moto S3), bad input exits 2 with one line."""
import json
import os
import subprocess
import sys

import pytest

RLHF = [sys.executable, "-m", "rlhf_tasks.cli"]


def rlhf(*args, env=None, cwd=None):
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=120)


def test_help_lists_commands():
    out = rlhf("--help").stdout
    for cmd in ("run", "sweep", "plan", "store", "report", "chat", "generate"):
        assert cmd in out


def _round_trip(store_url, tmp_path, env=None):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01" * 500)
    (src / "config.json").write_text("{}")
    r = rlhf("store", "put", str(src), "sft", "abc123", "--store", store_url, env=env)
    assert r.returncode == 0, r.stderr
    uri = r.stdout.strip()
    assert uri.endswith("/sft/abc123")
    r = rlhf("store", "ls", "--store", store_url, "--json", env=env)
    rows = json.loads(r.stdout)
    assert [(x["kind"], x["key"], x["status"]) for x in rows] == [("sft", "abc123", "ok")]
    r = rlhf("store", "verify", uri, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stderr
    dest = tmp_path / "dest"
    r = rlhf("store", "get", uri, "--dest", str(dest), env=env)
    assert r.returncode == 0, r.stderr
    assert (dest / "sub" / "w.bin").read_bytes() == b"\x00\x01" * 500


def test_store_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "store"), tmp_path)


def test_store_round_trip_s3(moto_server, s3_bucket, tmp_path):
    _round_trip(f"{s3_bucket}/p", tmp_path, env={"AWS_ENDPOINT_URL": moto_server})


def test_verify_fails_on_corruption(tmp_path):
    store = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("x")
    uri = rlhf("store", "put", str(src), "sft", "k", "--store", str(store)).stdout.strip()
    (store / "sft" / "k" / "a").write_text("y")
    r = rlhf("store", "verify", uri)
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr


def test_bad_config_exits_2_with_one_line(tmp_path):
    for args, needle in [
        (["plan", "--set", "ppo.klcoef=1"], "ppo.klcoef: unknown key"),
        (["plan", "--set", "sft.epochs=many"], "sft.epochs"),
        (["plan", "--set", "ppo.actor.epochs=3"], "ppo.actor.epochs: unknown key"),
        (["plan", "--set", "ppo.mini_batch_size=12"], "must be a multiple of ppo.mini_batch_size (12)"),
        (["plan", "--config", str(tmp_path / "nope.yaml")], "config file not found"),
    ]:
        r = rlhf(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr


# ---- the CLI layer: rlhf_tasks.cli -> flows -> the rest of rlhf_tasks, never back ------------------------------
def _import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports anywhere in its source (top level or inside functions), for rlhf_tasks
    and flows. `from . import x` is an edge to the submodule x, not to the package."""
    from conftest import ROOT

    from rlhf_tasks.provenance import imports_of

    files = {}
    for pkg in ("rlhf_tasks", "flows"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        for base, names in imports_of(f, mod):
            targets = [f"{base}.{n}" if f"{base}.{n}" in files else base for n in names] or [base]
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_the_old_cli_cycle():
    graph = _import_graph()
    graph["flows.cli_commands"].add("rlhf_tasks.cli")  # what flows/cli_commands.py used to import
    assert any({"rlhf_tasks.cli", "flows.cli_commands"} <= set(c) for c in _cycles(graph))


def test_cli_layer_has_no_import_cycle():
    graph = _import_graph()
    layer = {m for m in graph if m.startswith("flows") or m == "rlhf_tasks.cli"}
    assert [c for c in _cycles(graph) if layer & set(c)] == []
    assert [m for m in graph if m.startswith("flows") and "rlhf_tasks.cli" in graph[m]] == []
    assert [m for m in graph if m.startswith("rlhf_tasks") and m != "rlhf_tasks.cli"
            and any(t.startswith("flows") for t in graph[m])] == []


def test_cli_and_flows_import_in_either_order_in_a_fresh_interpreter():
    """`import flows.cli_commands` pulls in no CLI; `import rlhf_tasks.cli` pulls in neither flows nor Prefect;
    every flows module imports before and after the CLI."""
    from conftest import ROOT

    flows_mods = sorted("flows." + f.stem for f in (ROOT / "flows").glob("*.py") if f.stem != "__init__")
    assert "flows.cli_commands" in flows_mods
    first_flows = ("import importlib, sys\n"
                   f"for m in {['flows.cli_commands', *flows_mods]!r}:\n"
                   "    importlib.import_module(m)\n"
                   "    assert 'rlhf_tasks.cli' not in sys.modules, m\n"
                   "import rlhf_tasks.cli\n")
    first_cli = ("import importlib, sys\nimport rlhf_tasks.cli\n"
                 "assert not [m for m in sys.modules if m.split('.')[0] in ('flows', 'prefect')]\n"
                 f"for m in {flows_mods!r}:\n    importlib.import_module(m)\n")
    for code in (first_flows, first_cli):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr


def _one_error_line(capsys, argv: list[str], needle: str) -> None:
    from rlhf_tasks.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], (argv, rc, err)


def test_store_commands_refuse_bad_names_and_missing_stores(tmp_path, capsys):
    """Reading a store that does not exist creates nothing; reserved kinds and `..` are refused (exit 2, one line)."""
    typo = tmp_path / "sotre"
    _one_error_line(capsys, ["store", "ls", "--store", str(typo)], "does not exist")
    _one_error_line(capsys, ["store", "verify", f"{typo}/sft/k"], "does not exist")
    _one_error_line(capsys, ["store", "get", f"{typo}/sft/k"], "does not exist")
    _one_error_line(capsys, ["store", "gc", "--store", str(typo)], "does not exist")
    assert not typo.exists()
    store = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("x")
    for kind, key, needle in [("runs", "r1", "reserved"), ("_prefect", "cache", "bad artifact kind"),
                              (".git", "k", "bad artifact kind"), ("..", "k", "bad artifact kind"),
                              ("sft", "../../etc", "bad artifact key"), ("/etc", "k", "bad artifact kind")]:
        _one_error_line(capsys, ["store", "put", str(src), kind, key, "--store", str(store)], needle)
    assert not store.exists()
    _one_error_line(capsys, ["store", "get", f"{store}/sft/../../etc"], "'..' is not allowed")
    _one_error_line(capsys, ["store", "verify", f"{store}/sft/.."], "'..' is not allowed")


def test_model_and_store_errors_come_before_any_heavy_import(tmp_path):
    """The nonexistent-model and unknown-scheme cases (which used to launch a job, or print a traceback) fail
    before torch, Prefect, datasets or transformers is even imported, and leave no store behind."""
    code = ("import sys; from rlhf_tasks.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'prefect', 'datasets', 'transformers') if m in sys.modules]; "
            "sys.exit(0 if rc == 2 and not heavy else f'rc={rc}, imported {heavy}')")
    store = tmp_path / "store"
    for argv, needle in [(["run", "--set", "models.actor=/nonexistent/model", "--store", str(store)],
                          "error: models.actor: /nonexistent/model: no such folder"),
                         (["run", "--store", "nosuchscheme://x/y"], "error: store.url: unknown scheme 'nosuchscheme'"),
                         (["plan", "--store", "nosuchscheme://x/y"], "error: store.url: unknown scheme 'nosuchscheme'")]:
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        assert r.returncode == 0, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(needle), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_s3_store_is_checked_before_the_data(moto_server, s3_bucket, monkeypatch, capsys):
    from rlhf_tasks.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    missing = "s3://no-such-bucket-for-rlhf/p"
    _one_error_line(capsys, ["plan", "--store", missing], "store.url: s3://no-such-bucket-for-rlhf/p: bucket "
                                                          "'no-such-bucket-for-rlhf' does not exist")
    capsys.readouterr()
    assert main(["plan", "--store", f"{s3_bucket}/p", "--until", "data"]) == 0
    assert "will-run" in capsys.readouterr().out


def test_a_cached_data_artifact_gives_the_row_counts_without_reading_the_rows(tmp_path, monkeypatch):
    """With the data artifact cached, the check that one training step fits in its phase uses the row counts in
    the artifact's manifest: a micro batch one row larger than the cached sft phase is refused (one line, nothing
    written), and the sources are not read again."""
    from rlhf_tasks import preflight
    from rlhf_tasks.config import load_config
    from rlhf_tasks.data import stage as data_stage
    from rlhf_tasks.errors import ConfigError

    cfg = load_config(None, [f"store.url={tmp_path / 'store'}"])
    store, plans = preflight.checked_plan(cfg, "data")
    assert not plans[0].cached
    summary = data_stage.prepare(cfg, tmp_path / "data")
    store.put_dir(tmp_path / "data", "data", plans[0].key, metrics=summary)
    reads = []
    monkeypatch.setattr(data_stage, "validate_sources", lambda *a, **k: reads.append(a) or {})
    sft_rows = summary["rows.sft.train"]
    sft = ["sft.grad_accum=1", f"store.url={tmp_path / 'store'}"]
    big = load_config(None, [*sft, f"sft.micro_batch_size={sft_rows + 1}"])
    with pytest.raises(ConfigError) as ei:
        preflight.checked_plan(big, "sft")
    assert f"at most {sft_rows} training rows" in str(ei.value) and "the cached data artifact" in str(ei.value)
    assert "\n" not in str(ei.value)
    assert [(kind, key) for kind, key, _ in store.ls()] == [("data", plans[0].key)]
    fits = load_config(None, [*sft, f"sft.micro_batch_size={sft_rows}"])
    _, plans = preflight.checked_plan(fits, "sft")
    assert plans[0].cached and not plans[1].cached and reads == []
