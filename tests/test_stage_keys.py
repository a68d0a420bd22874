"""The stage key is honest: it changes with every module of ours a stage can execute, with the versions of the
libraries that shape results and with the commit a hub model or dataset points to; `rlhf plan` says which."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks import provenance, stages
from rlhf_tasks.cli import main
from rlhf_tasks.config import SourceConfig, load_config
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.store import ArtifactStore, compute_key

SHA_A = "a" * 40
SHA_B = "b" * 40


# ---- code: the import closure ---------------------------------------------------------------------------------
def _fake_package(root: Path) -> Path:
    pkg = root / "pkg"
    files = {
        "__init__.py": "",
        "stage.py": '"""The stage."""\nfrom . import helper\nfrom .sub import tools\n\n\ndef run():\n'
                    '    from .lazy import f  # imported only when run\n    return helper.g() + f()\n',
        "helper.py": "def g():\n    return 1\n",
        "lazy.py": "def f():\n    return 2\n",
        "sub/__init__.py": "from .. import errors\n",
        "sub/tools.py": "import os\n",
        "errors.py": "",
        "unrelated.py": "import pkg.helper\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_code_hashes_cover_the_import_closure(tmp_path):
    pkg = _fake_package(tmp_path)
    hashes = lambda: provenance.code_hashes(["pkg.stage"], pkg, "pkg")  # noqa: E731
    first = hashes()
    assert set(first) == {"__init__.py", "stage.py", "helper.py", "lazy.py", "sub/__init__.py", "sub/tools.py",
                          "errors.py"}  # not unrelated.py; lazy imports, parent packages and `..` imports count
    (pkg / "lazy.py").write_text("def f():\n    return 3\n")  # an edited imported module
    second = hashes()
    assert second["lazy.py"] != first["lazy.py"] and {k for k in first if first[k] != second[k]} == {"lazy.py"}
    (pkg / "unrelated.py").write_text("X = 1\n")
    (pkg / "helper.py").write_text("# a comment\ndef g():\n    '''Docs.'''\n    return 1  # same code\n")
    assert hashes() == second  # comments, docstrings and modules it cannot execute do not count


def test_closure_holds_every_module_a_stage_job_imports():
    """Static analysis against the truth: each stage's job, imported in a fresh interpreter, loads only modules
    of ours that its code version covers."""
    for name, d in stages.STAGE_DEFS.items():
        code = (f"import sys, {stages.JOB_ENTRY}, {d.module}; "
                "print(' '.join(m for m in sys.modules if m == 'rlhf_tasks' or m.startswith('rlhf_tasks.')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        loaded = {provenance.module_file(m).relative_to(provenance.PACKAGE_DIR).as_posix()
                  for m in out.stdout.split()}
        covered = set(stages.code_version(name))
        assert len(loaded) > 10  # the job really imported our modules
        assert loaded <= covered, (name, loaded - covered)
        assert d.module.replace(".", "/").removeprefix("rlhf_tasks/") + ".py" in covered


def test_each_stage_is_keyed_by_its_own_closure():
    """An edit re-runs the stages that can execute it, not every stage."""
    code = {s: stages.code_version(s) for s in stages.STAGES}
    assert "evaluation/report.py" in code["eval"] and "evaluation/report.py" not in code["sft"]
    assert "data/stage.py" in code["data"] and "data/stage.py" not in code["sft"]
    assert "training/sft.py" in code["sft"] and "training/sft.py" not in code["reward"]
    assert all("stage_main.py" in c and "store.py" in c for c in code.values())


# ---- libraries --------------------------------------------------------------------------------------------------
def test_library_versions_enter_the_key_and_the_plan_reason(tmp_path, monkeypatch):
    from importlib import metadata

    cfg = load_config(None)
    versions = provenance.library_versions()
    assert versions == {n: metadata.version(n) for n in provenance.RESULT_LIBRARIES}
    ki = stages.stage_key_inputs(cfg, "sft", {"data": "d"})
    assert ki["libraries"] == versions
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x").write_text("x")
    store.put_dir(tmp_path / "art", "sft", compute_key(ki), key_inputs=ki)
    # An upgraded transformers: a real distribution record earlier on sys.path than the installed one.
    dist = tmp_path / "site" / "transformers-99.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 99.1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert metadata.version("transformers") == "99.1.0"
    upgraded = stages.stage_key_inputs(cfg, "sft", {"data": "d"})
    assert compute_key(upgraded) != compute_key(ki)
    assert stages.explain_change(store, "sft", upgraded) == f"transformers {versions['transformers']} -> 99.1.0"


# ---- hub revisions ----------------------------------------------------------------------------------------------
def fake_hub_cache(root: Path, repo: str, sha: str, kind: str = "model") -> Path:
    """The Hugging Face cache layout: refs/main holds the commit, snapshots/<commit>/ the files."""
    folder = root / f"{kind}s--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(sha)
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (snap / ("config.json" if kind == "model" else "README.md")).write_text("{}")
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_hub_model_is_keyed_by_the_commit_its_cached_ref_points_to(hf_cache, tmp_path):
    from rlhf_tasks.models import model_identity

    cfg = load_config(None, ["models.actor=facebook/opt-125m"])
    with pytest.raises(ConfigError, match=r"^models.actor: cannot resolve hub revision 'main' of facebook/opt-125m "
                                          r"offline; pin models.revision to a commit"):
        stages.stage_key_inputs(cfg, "sft", {"data": "d"})
    fake_hub_cache(hf_cache, "facebook/opt-125m", SHA_A)
    ki = stages.stage_key_inputs(cfg, "sft", {"data": "d"})
    assert ki["config"]["actor"] == {"hub": "facebook/opt-125m", "revision": SHA_A}
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x").write_text("x")
    store.put_dir(tmp_path / "art", "sft", compute_key(ki), key_inputs=ki)
    fake_hub_cache(hf_cache, "facebook/opt-125m", SHA_B)  # upstream moved; the cache was refreshed
    moved = stages.stage_key_inputs(cfg, "sft", {"data": "d"})
    assert compute_key(moved) != compute_key(ki)
    assert stages.explain_change(store, "sft", moved) == f"hub facebook/opt-125m {SHA_A[:12]} -> {SHA_B[:12]}"
    # A pinned full commit is used as given (no cache needed); a bad name is named, not looked up.
    assert model_identity("org/other", revision=SHA_A)["revision"] == SHA_A
    with pytest.raises(ConfigError, match="models.reward: /nonexistent/model: no such folder"):
        model_identity("/nonexistent/model", where="models.reward")


def test_unresolvable_hub_model_makes_plan_exit_2_with_one_line(hf_cache, tmp_path, capsys):
    rc = main(["plan", "--store", str(tmp_path / "store"), "--set", "models.actor=facebook/opt-125m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: models.actor: cannot resolve hub revision 'main' of facebook/opt-125m offline")
    assert not (tmp_path / "store").exists()


def test_hub_dataset_is_keyed_by_commit(hf_cache, tmp_path):
    from rlhf_tasks.data.sources import fingerprint_source

    src = SourceConfig(path="Dahoas/rm-static")
    with pytest.raises(ConfigError, match=r"^data.sources\[2\].path: cannot resolve hub revision 'main' of "
                                          r"Dahoas/rm-static offline; pin data.sources\[2\].revision"):
        fingerprint_source(src, "data.sources[2]")
    fake_hub_cache(hf_cache, "Dahoas/rm-static", SHA_A, kind="dataset")
    first = fingerprint_source(src)
    assert first == {"kind": "hub", "name": "Dahoas/rm-static", "revision": SHA_A}
    cfg = load_config(None)
    old_ki = stages.stage_key_inputs(cfg, "data", {}, fingerprints=[first])
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x").write_text("x")
    store.put_dir(tmp_path / "art", "data", compute_key(old_ki), key_inputs=old_ki)
    fake_hub_cache(hf_cache, "Dahoas/rm-static", SHA_B, kind="dataset")
    assert fingerprint_source(src)["revision"] == SHA_B
    new_ki = stages.stage_key_inputs(cfg, "data", {}, fingerprints=[fingerprint_source(src)])
    assert compute_key(new_ki) != compute_key(old_ki)
    assert stages.explain_change(store, "data", new_ki) == f"hub Dahoas/rm-static {SHA_A[:12]} -> {SHA_B[:12]}"
    assert fingerprint_source(SourceConfig(path="Dahoas/rm-static", revision=SHA_A))["revision"] == SHA_A


def test_a_store_artifact_folder_is_named_by_its_key_only_while_it_verifies(tmp_path):
    from rlhf_tasks.models import model_identity

    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"a": 1}))
    store.put_dir(tmp_path / "m", "sft", "k1")
    folder = tmp_path / "store" / "sft" / "k1"
    assert model_identity(str(folder)) == {"artifact": ["sft", "k1"]} == model_identity(store.uri("sft", "k1"))
    (folder / "config.json").write_text(json.dumps({"a": 2}))  # edited in place: no longer what its key says
    assert "local_sha256" in model_identity(str(folder))


def test_a_job_loads_the_commit_its_key_names_even_after_the_hub_moved(hf_cache, tmp_path):
    """Plan pins the commit; the repo moves before the (queued) job starts; the job still loads the pinned one."""
    from rlhf_tasks.models import resolve_model
    from rlhf_tasks.training.examples import StageContext, resolve_model_path

    cfg = load_config(None, ["models.actor=facebook/opt-125m"])
    fake_hub_cache(hf_cache, "facebook/opt-125m", SHA_A)
    pins = stages.hub_pins(stages.stage_key_inputs(cfg, "sft", {"data": "d"}))
    assert pins == {"facebook/opt-125m": SHA_A}
    fake_hub_cache(hf_cache, "facebook/opt-125m", SHA_B)
    assert Path(resolve_model("facebook/opt-125m")).name == SHA_B  # unpinned: what main points to now
    ctx = StageContext(cfg, 0, 1, None, tmp_path, pins)
    assert Path(resolve_model_path("facebook/opt-125m", ctx)).name == SHA_A
    assert stages.hub_pins(stages.stage_key_inputs(load_config(None), "sft", {"data": "d"})) == {}  # tiny: none
