"""Data sources at a URL (`s3://bucket/pairs.jsonl`) on the real moto S3 server: read like a local file, keyed by
content (a local file with the same name and bytes gives the same data key; a changed object a new one), large
objects by ETag and size, and a bad URL is one line naming the source, before anything runs."""
from __future__ import annotations

import json

import boto3
import pytest

from rlhf_tasks import stages
from rlhf_tasks.config import config_from_dict
from rlhf_tasks.data import sources
from rlhf_tasks.errors import ConfigError, DataError


def _rows(n, tag=""):
    text = "".join(json.dumps({"prompt": f"question {tag}{i}", "chosen": f"good answer {tag}{i}",
                               "rejected": f"bad answer {tag}{i}"}) + "\n" for i in range(n))
    return text.encode()


@pytest.fixture
def bucket(s3_bucket, moto_server, tmp_path, monkeypatch):
    """(s3 client, bucket name, endpoint); the local caches in tmp_path, AWS_ENDPOINT_URL unset (the config's
    store.endpoint_url must be what reaches the server)."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return boto3.client("s3", endpoint_url=moto_server), s3_bucket.removeprefix("s3://"), moto_server


def _cfg(path, endpoint, store="./rlhf-store"):
    return config_from_dict({"data": {"sources": [{"path": path}]},
                             "store": {"url": store, "endpoint_url": endpoint}})


def test_an_s3_source_is_read_and_keyed_like_the_same_local_file(bucket, tmp_path):
    s3, name, endpoint = bucket
    s3.put_object(Bucket=name, Key="data/pairs.jsonl", Body=_rows(40))
    remote = _cfg(f"s3://{name}/data/pairs.jsonl", endpoint)
    local_file = tmp_path / "pairs.jsonl"
    local_file.write_bytes(_rows(40))
    local = _cfg(str(local_file), endpoint)

    assert stages.data_source_fingerprints(remote) == stages.data_source_fingerprints(local)
    assert stages.config_slice(remote, "data") == stages.config_slice(local, "data")
    assert stages.compute_key(stages.stage_key_inputs(remote, "data", {})) == \
        stages.compute_key(stages.stage_key_inputs(local, "data", {}))

    [resolved] = sources.resolve_sources(remote.data.sources, endpoint)
    loaded = sources.load_source(resolved)
    assert resolved.kind == "remote" and resolved.name == "pairs"
    assert [r.data["prompt"] for r in loaded.splits["train"]][:2] == ["question 0", "question 1"]
    assert len(loaded.splits["train"]) == 40 and loaded.splits["train"][3].row == 4

    from rlhf_tasks.data.stage import validate_sources

    assert validate_sources(remote)["sources"]["pairs"]["valid"] == 40  # the preflight reads it like a file


def test_a_changed_object_changes_the_key_and_a_queued_job_refuses_it(bucket):
    from rlhf_tasks.data.stage import check_sources_unchanged

    s3, name, endpoint = bucket
    s3.put_object(Bucket=name, Key="pairs.jsonl", Body=_rows(40))
    cfg = _cfg(f"s3://{name}/pairs.jsonl", endpoint)
    planned = stages.data_source_fingerprints(cfg)
    assert stages.data_source_fingerprints(cfg) == planned  # unchanged: same fingerprint (remembered by ETag)
    check_sources_unchanged(cfg, planned)
    s3.put_object(Bucket=name, Key="pairs.jsonl", Body=_rows(40, tag="v2-"))  # one row's text changes
    assert stages.data_source_fingerprints(cfg) != planned
    with pytest.raises(DataError, match=rf"^data.sources\[0\].path: s3://{name}/pairs.jsonl changed since the plan"):
        check_sources_unchanged(cfg, planned)


def test_an_object_too_large_to_hash_is_keyed_by_etag_and_size(bucket, monkeypatch):
    s3, name, endpoint = bucket
    s3.put_object(Bucket=name, Key="big.jsonl", Body=_rows(40))
    monkeypatch.setattr(sources, "REMOTE_HASH_LIMIT_BYTES", 100)
    [fp] = stages.data_source_fingerprints(_cfg(f"s3://{name}/big.jsonl", endpoint))
    etag = s3.head_object(Bucket=name, Key="big.jsonl")["ETag"].strip('"')
    assert fp == {"kind": "remote-object", "url": f"s3://{name}/big.jsonl", "etag": etag, "size": len(_rows(40))}


@pytest.mark.parametrize("path, message", [
    ("s3://{bucket}/missing.jsonl", "data.sources[0].path: no such object: s3://{bucket}/missing.jsonl"),
    ("s3://no-such-bucket-rlhf/pairs.jsonl", "data.sources[0].path: no such object: s3://no-such-bucket-rlhf/pairs.jsonl"),
    ("s3://{bucket}/folder.jsonl", "data.sources[0].path: s3://{bucket}/folder.jsonl is a folder; a remote source is one data file"),
    ("s3://{bucket}/notes.txt", "data.sources[0].path: s3://{bucket}/notes.txt: a remote source is one data file"),
    ("nosuchscheme://x/pairs.jsonl", "data.sources[0].path: nosuchscheme://x/pairs.jsonl: Protocol not known: nosuchscheme"),
])
def test_a_bad_remote_source_is_one_line_exit_2_before_anything_runs(bucket, tmp_path, capsys, path, message):
    from rlhf_tasks.cli import main

    s3, name, endpoint = bucket
    s3.put_object(Bucket=name, Key="folder.jsonl/part-0.jsonl", Body=_rows(4))
    path, message = path.format(bucket=name), message.format(bucket=name)
    with pytest.raises(ConfigError) as e:
        stages.data_source_fingerprints(_cfg(path, endpoint))
    assert str(e.value).startswith(message)
    store = tmp_path / "store"
    rc = main(["plan", "--store", str(store), "--set", f"store.endpoint_url={endpoint}",
               "--set", f"data.sources=[{{path: '{path}'}}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not store.exists()  # nothing written
