"""The `rlhf` command: help, store round trip (local and moto S3), bad input exits 2 with one line."""
import json
import os
import subprocess
import sys

RLHF = [sys.executable, "-m", "rlhf_tasks.cli"]


def rlhf(*args, env=None, cwd=None):
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=120)


def test_help_lists_commands():
    out = rlhf("--help").stdout
    for cmd in ("run", "plan", "store", "report", "chat", "generate"):
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
        (["plan", "--config", str(tmp_path / "nope.yaml")], "config file not found"),
    ]:
        r = rlhf(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
