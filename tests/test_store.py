"""The artifact store, against a local folder and a real S3-compatible server (moto) alike."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks.errors import ArtifactCorrupt, StoreError
from rlhf_tasks.store import MANIFEST, MISSING, compute_key, open_store_for_uri, sha256_file


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


def test_same_size_corruption_is_a_miss_and_a_recompute_replaces_it(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"w.bin": b"x" * 100, "ok.txt": b"fine"})
    any_store.put_dir(src, "sft", "k")
    assert any_store.check("sft", "k") is None
    path = f"{any_store.root}/sft/k/w.bin"
    with any_store.fs.open(path, "wb") as f:
        f.write(b"y" * 100)  # same size, different content
    assert not any_store.exists("sft", "k")  # not a cache hit
    assert "w.bin sha256 mismatch" in any_store.check("sft", "k")
    with pytest.raises(ArtifactCorrupt, match="w.bin sha256 mismatch"):
        any_store.get("sft", "k")  # never handed to a stage
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        any_store.verify("sft", "k", deep=True)
    any_store.put_dir(src, "sft", "k")  # the recompute commits over the corrupted artifact
    assert any_store.exists("sft", "k")
    assert (any_store.get("sft", "k") / "w.bin").read_bytes() == b"x" * 100
    any_store.fs.rm(path)
    assert "missing file w.bin" in any_store.check("sft", "k")
    assert any_store.check("sft", "nothing") == MISSING


def test_a_rewrite_that_restores_mtime_is_still_seen(local_store, tmp_path):
    src = make_dir(tmp_path / "src", {"model.safetensors": os.urandom(4096)})
    local_store.put_dir(src, "sft", "k")
    target = Path(local_store.root) / "sft" / "k" / "model.safetensors"
    st = target.stat()
    with open(target, "r+b") as f:  # flip one byte in place
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert "model.safetensors sha256 mismatch" in local_store.check("sft", "k")


def test_file_hashes_are_remembered_outside_the_artifact(any_store, tmp_path):
    """The commit records each uploaded file version's sha256 in the store's cache_dir, so the first check of a
    fresh artifact reads nothing, and the artifact folder holds only its files and manifest."""
    src = make_dir(tmp_path / "src", {"a.bin": os.urandom(2000), "sub/b.bin": os.urandom(10)})
    any_store.put_dir(src, "sft", "k")
    records = [p for p in (tmp_path / "cache" / "sha256").rglob("*") if p.is_file()]
    assert sorted(p.read_text() for p in records) == sorted(sha256_file(src / r) for r in ("a.bin", "sub/b.bin"))
    listed = {p.rsplit("/", 1)[-1] for p in any_store.fs.find(f"{any_store.root}/sft/k")}
    assert listed == {"a.bin", "b.bin", MANIFEST}
    for rec in records:  # a wrong remembered hash would be believed: proof that checks use the memory
        rec.write_text("0" * 64)
    assert "sha256 mismatch" in any_store.check("sft", "k")
    assert any_store.verify("sft", "k", deep=True)  # deep re-reads every byte (and refreshes the memory)
    assert any_store.check("sft", "k") is None


def test_names_cannot_escape_root(local_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    for kind, key in [("..", "k"), ("sft", ".."), ("sft", "../x"), ("/abs", "k"), ("sft", "a/b"), ("SFT", "k"),
                      ("sft", ""), ("sft", "k..x")]:
        with pytest.raises(StoreError):
            local_store.put_dir(src, kind, key)
    with pytest.raises(StoreError):
        local_store.write_json("../escape.json", {})
    assert not (tmp_path / "escape.json").exists()
    for kind in ("runs", "_prefect", ".hidden", "_x"):  # reserved folders beside the artifacts
        with pytest.raises(StoreError, match="reserved|bad artifact kind"):
            local_store.put_dir(src, kind, "r1")
    assert not (Path(local_store.root) / "runs").exists() and not (Path(local_store.root) / "_prefect").exists()
    local_store.put_dir(src, "sft", "k")
    for uri in (f"{local_store.url}/sft/../sft/k", f"{local_store.url}/sft/k/..", f"{tmp_path}/../x/sft/k"):
        with pytest.raises(StoreError, match="'..' is not allowed"):
            open_store_for_uri(uri)
        with pytest.raises(StoreError, match="'..' is not allowed"):
            local_store.get_uri(uri)


def test_reading_a_missing_store_creates_nothing(tmp_path):
    from rlhf_tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "typo"), cache_dir=tmp_path / "cache")
    assert list(store.ls()) == [] and not store.exists("sft", "k")
    with pytest.raises(StoreError, match="does not exist"):
        store.require_existing()
    assert not (tmp_path / "typo").exists()


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
orig = store._upload_hashed
def slow_upload(src, target, *a, **k):
    out = orig(src, target, *a, **k)
    print("uploaded", target, flush=True)
    time.sleep(0.3)
    return out
store._upload_hashed = slow_upload
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


def _cache_record(store, name: str, result) -> None:
    """A record as Prefect writes it to result storage: metadata plus the serialized (JSON) result."""
    store.fs.makedirs(f"{store.root}/_prefect/cache", exist_ok=True)
    with store.fs.open(f"{store.root}/_prefect/cache/{name}", "w") as f:
        json.dump({"metadata": {"storage_key": name, "serializer": {"type": "json"}},
                   "result": json.dumps(result)}, f)


def test_gc_removes_cache_records_that_name_no_artifact(any_store, tmp_path):
    src = make_dir(tmp_path / "src", {"a": b"1"})
    live = any_store.put_dir(src, "sft", "live")
    gone = any_store.put_dir(src, "sft", "gone")
    any_store.delete("sft", "gone")
    _cache_record(any_store, "rlhf-v1-sft-live", live)
    _cache_record(any_store, "rlhf-v1-sft-gone", gone)
    _cache_record(any_store, "3f1c9a0e2b7d4c5e8f6a1b2c3d4e5f6a", {"type": "reference", "message": "stage failed"})
    assert any_store.gc(min_age_s=3600) == []  # young records are left alone (a run may be writing them)
    base = f"{any_store.url}/_prefect/cache"
    expected = {f"{base}/rlhf-v1-sft-gone", f"{base}/3f1c9a0e2b7d4c5e8f6a1b2c3d4e5f6a"}
    assert set(any_store.gc(min_age_s=0, dry_run=True)) == expected
    assert set(any_store.gc(min_age_s=0)) == expected
    left = [p.rsplit("/", 1)[-1] for p in any_store.fs.find(f"{any_store.root}/_prefect/cache")]
    assert left == ["rlhf-v1-sft-live"] and any_store.exists("sft", "live")


def test_stage_failed_pickles():
    import pickle

    from rlhf_tasks.errors import StageFailed

    e = pickle.loads(pickle.dumps(StageFailed("sft", "exit code 1", 1, "tail")))
    assert (e.stage, e.returncode, e.log_tail, str(e)) == ("sft", 1, "tail", "stage 'sft' failed: exit code 1")


def test_a_corrupted_local_copy_of_a_remote_artifact_is_fetched_again(s3_store, tmp_path):
    src = make_dir(tmp_path / "src", {"model.safetensors": os.urandom(3000)})
    s3_store.put_dir(src, "sft", "k")
    copy = s3_store.get("sft", "k")
    good = (copy / "model.safetensors").read_bytes()
    with open(copy / "model.safetensors", "r+b") as f:
        f.write(bytes([good[0] ^ 1]))
    again = s3_store.get("sft", "k")
    assert again == copy and (again / "model.safetensors").read_bytes() == good == (src / "model.safetensors").read_bytes()


def test_manifest_describes_the_bytes_written_while_a_writer_still_appends(any_store, tmp_path):
    """A file still being written (a TensorBoard thread flushing) while its folder is committed: the manifest must
    hold the size and sha256 of the bytes that reached the store, so the artifact verifies deeply."""
    import threading
    import time

    src = tmp_path / "out"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(4 << 20))  # big enough that the upload overlaps the writer
    events = src / "events.log"
    events.write_bytes(b"start\n")
    stop = threading.Event()

    def keep_appending():  # about 1 MiB over a second or more: still writing while put_dir hashes and copies
        with open(events, "ab", buffering=0) as f:
            for _ in range(2000):
                if stop.is_set():
                    return
                f.write(b"x" * 512)
                time.sleep(0.0005)

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        any_store.put_dir(src, "sft", "k-live-writer")
    finally:
        stop.set()
        writer.join()
    m = any_store.verify("sft", "k-live-writer", deep=True)  # raises ArtifactCorrupt on any mismatch
    assert {f["path"] for f in m.files} == {"model.bin", "events.log"}
