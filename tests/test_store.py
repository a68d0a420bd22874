"""The artifact store, against a local folder and a real S3-compatible server (moto) alike."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks.errors import ArtifactCorrupt, StoreError
from rlhf_tasks.store import MANIFEST, compute_key, open_store_for_uri


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_key_is_canonical_and_sensitive():
    a = compute_key({"x": 1, "y": {"b": 2, "a": 1}})
    assert a == compute_key({"y": {"a": 1, "b": 2}, "x": 1})
    assert a != compute_key({"x": 1, "y": {"b": 2, "a": 2}})
    assert len(a) == 24


def test_round_trip(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a.txt": b"hello", "sub/b.bin": os.urandom(3000)})
    key = compute_key({"t": 1})
    assert not any_store.exists("sft", key)
    uri = any_store.put_dir(src, "sft", key, key_inputs={"t": 1}, lineage={"data": "x"}, metrics={"loss": 0.5})
    assert uri == any_store.uri("sft", key)
    assert any_store.exists("sft", key)
    m = any_store.verify("sft", key, deep=True)
    assert {f["path"] for f in m.files} == {"a.txt", "sub/b.bin"}
    assert m.metrics == {"loss": 0.5} and m.lineage == {"data": "x"} and m.key_inputs == {"t": 1}
    got = any_store.get("sft", key)
    assert (got / "a.txt").read_bytes() == b"hello"
    assert (got / "sub/b.bin").read_bytes() == (src / "sub/b.bin").read_bytes()
    listed = [(k, key_, m is not None) for k, key_, m in any_store.ls()]
    assert ("sft", key, True) in listed
    # URIs reopen the same store.
    store2, kind, key2 = open_store_for_uri(uri, endpoint_url=any_store.endpoint_url)
    assert (kind, key2) == ("sft", key) and store2.exists(kind, key2)


def test_put_is_idempotent_and_immutable(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a.txt": b"one"})
    uri = any_store.put_dir(src, "data", "k1")
    (src / "a.txt").write_bytes(b"two")
    assert any_store.put_dir(src, "data", "k1") == uri
    assert (any_store.get("data", "k1") / "a.txt").read_bytes() == b"one"


def test_corruption_is_detected(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"w.bin": b"x" * 100})
    any_store.put_dir(src, "sft", "k")
    path = f"{any_store.root}/sft/k/w.bin"
    with any_store.fs.open(path, "wb") as f:
        f.write(b"y" * 100)  # same size, different content
    assert any_store.exists("sft", "k")  # cheap check sees sizes only
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        any_store.verify("sft", "k", deep=True)
    any_store.fs.rm(path)
    assert not any_store.exists("sft", "k")


def test_names_cannot_escape_root(local_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    for kind, key in [("..", "k"), ("sft", ".."), ("sft", "../x"), ("/abs", "k"), ("sft", "a/b"), ("SFT", "k"),
                      ("sft", ""), ("sft", "k..x")]:
        with pytest.raises(StoreError):
            local_store.put_dir(src, kind, key)
    with pytest.raises(StoreError):
        local_store.write_json("../escape.json", {})
    assert not (tmp_path / "escape.json").exists()


def test_bad_manifest_means_absent(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    any_store.put_dir(src, "sft", "k")
    with any_store.fs.open(f"{any_store.root}/sft/k/{MANIFEST}", "w") as f:
        f.write("{not json")
    assert not any_store.exists("sft", "k")
    assert [m for _, _, m in any_store.ls("sft")] == [None]


def test_delete_and_gc(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    any_store.put_dir(src, "sft", "final")
    any_store.put_dir(src, "ckpt-sft", "final.step-00000002")
    any_store.put_dir(src, "ckpt-ppo", "other.step-00000002")  # its stage has not finished: kept
    # An unfinished upload: files but no manifest.
    any_store.fs.makedirs(f"{any_store.root}/reward/broken", exist_ok=True)
    with any_store.fs.open(f"{any_store.root}/reward/broken/model.bin", "wb") as f:
        f.write(b"partial")
    removed = any_store.gc(min_age_s=0, dry_run=True)
    assert set(removed) == {any_store.uri("ckpt-sft", "final.step-00000002"), any_store.uri("reward", "broken")}
    any_store.gc(min_age_s=0)
    assert not any_store.fs.exists(f"{any_store.root}/reward/broken")
    assert any_store.exists("ckpt-ppo", "other.step-00000002") and any_store.exists("sft", "final")
    any_store.delete("sft", "final")
    assert not any_store.exists("sft", "final")


def test_unreferenced_gc_keeps_lineage(local_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    data = local_store.put_dir(src, "data", "d")
    local_store.put_dir(src, "sft", "s", lineage={"data": data})
    local_store.put_dir(src, "sft", "orphan")
    removed = local_store.gc(unreferenced=True, keep={local_store.uri("sft", "s")})
    assert removed == [local_store.uri("sft", "orphan")]


_KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
from rlhf_tasks.store import ArtifactStore
store = ArtifactStore(sys.argv[1], endpoint_url=sys.argv[3] or None)
orig = store.fs.put_file
def slow_put(lpath, rpath, *a, **k):
    orig(lpath, rpath, *a, **k)
    print("uploaded", rpath, flush=True)
    time.sleep(0.3)
store.fs.put_file = slow_put
store.put_dir(Path(sys.argv[2]), "sft", "victim")
print("DONE", flush=True)
"""


def test_killed_upload_never_verifies(any_store, tmp_path):
    """SIGKILL in the middle of put_dir leaves files without a manifest: not present, not verifying."""
    src = make_dir(tmp_path / "src", {f"shard-{i}.bin": os.urandom(2048) for i in range(6)})
    script = tmp_path / "put.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), any_store.url, str(src), any_store.endpoint_url or ""],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    seen = 0
    for line in proc.stdout:
        if line.startswith("uploaded"):
            seen += 1
            if seen == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert seen == 3
    assert any_store.fs.exists(f"{any_store.root}/sft/victim")  # half-written files are there ...
    assert not any_store.exists("sft", "victim")  # ... but the artifact does not exist
    with pytest.raises(ArtifactCorrupt):
        any_store.verify("sft", "victim")
    # A later put of the same key replaces the leftovers and commits cleanly.
    any_store.put_dir(src, "sft", "victim")
    assert len(any_store.verify("sft", "victim").files) == 6


def test_s3_credentials_never_in_settings(s3_store):
    assert "testing" not in json.dumps(s3_store.settings())


def test_run_records_are_not_artifacts_and_are_gc_roots(local_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    kept = local_store.put_dir(src, "eval", "e1")
    local_store.put_dir(src, "eval", "e2")
    local_store.write_json("runs/r1.json", {"stages": {"eval": {"uri": kept, "status": "ran"}}})
    assert "runs" not in local_store.kinds()
    assert [(k, key) for k, key, _ in local_store.ls()] == [("eval", "e1"), ("eval", "e2")]
    assert local_store.gc(unreferenced=True) == [local_store.uri("eval", "e2")]
    assert local_store.read_json("runs/r1.json")["stages"]["eval"]["uri"] == kept


def test_stage_failed_pickles():
    import pickle

    from rlhf_tasks.errors import StageFailed

    e = pickle.loads(pickle.dumps(StageFailed("sft", "exit code 1", 1, "tail")))
    assert (e.stage, e.returncode, e.log_tail, str(e)) == ("sft", 1, "tail", "stage 'sft' failed: exit code 1")
