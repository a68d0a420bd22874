"""Links to store artifacts for the Prefect UI: a presigned http link on S3 (fetched here from the moto server), no
link but the URI and the download command on a local store."""
from __future__ import annotations

import json
import urllib.request

from rlhf_tasks.store_links import LINK_EXPIRY_S, artifact_link, get_command


def _put(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "report.md").write_text("# report\n")
    store.put_dir(src, "eval", "k1")


def test_s3_links_are_presigned_http_urls_that_open(s3_store, tmp_path):
    _put(s3_store, tmp_path)
    link = artifact_link(s3_store, "eval", "k1")
    assert link.how == "presigned" and link.url.startswith(s3_store.endpoint_url + "/")
    assert "Signature=" in link.url
    with urllib.request.urlopen(link.url, timeout=10) as r:  # what a browser would get
        manifest = json.loads(r.read())
    assert manifest["kind"] == "eval" and manifest["key"] == "k1"
    report = artifact_link(s3_store, "eval", "k1", "report.md")
    with urllib.request.urlopen(report.url, timeout=10) as r:
        assert r.read() == b"# report\n"
    assert link.command == f"AWS_ENDPOINT_URL={s3_store.endpoint_url} rlhf store get {s3_store.url}/eval/k1"
    md = link.markdown("eval artifact")
    assert f"]({link.url}) (presigned link, valid {LINK_EXPIRY_S // 86400} days)" in md
    assert f"URI: `{link.uri}`" in md and f"`{link.command}`" in md


def test_local_links_are_the_uri_and_the_command(local_store, tmp_path):
    _put(local_store, tmp_path)
    link = artifact_link(local_store, "eval", "k1")
    assert link.url is None and link.how is None
    assert link.uri == f"{local_store.url}/eval/k1" and link.command == f"rlhf store get {link.uri}"
    md = link.markdown("eval artifact")
    assert "file://" not in md and "](" not in md and f"`rlhf store get {link.uri}`" in md


def test_the_command_downloads_the_artifact(s3_store, tmp_path, monkeypatch, capsys):
    from rlhf_tasks.cli import main

    _put(s3_store, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint_url)
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    command = get_command(s3_store, s3_store.uri("eval", "k1")).split()
    assert command[1:3] == ["rlhf", "store"]
    assert main(command[2:]) == 0
    folder = capsys.readouterr().out.strip()
    assert open(f"{folder}/report.md").read() == "# report\n"


def test_the_sweep_report_is_linked_on_s3_and_named_by_uri_locally(s3_store, local_store):
    from flows.sweep import report_where
    from flows.sweep_loop import SweepResult

    for store in (s3_store, local_store):
        uri = store.write_file("sweeps/abc123/sweep-report.md", b"# sweep\n")
        where = report_where(store, "abc123", SweepResult(record={}, report_uri=uri))
        if store is local_store:
            assert where == uri
            continue
        url, how = where.rsplit(" (", 1)
        assert how == "presigned link)"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read() == b"# sweep\n"
