"""Links to store artifacts that a person can use from the Prefect UI (or any markdown page).

A browser opens http(s) only: a `file://` link from a web page is refused and `s3://` is no link at all. So:
- an http(s) store: the object's own URL;
- any store whose filesystem can sign (S3 through s3fs, with AWS's endpoint or an S3-compatible http(s) one such
  as MinIO): a presigned GET URL of one object (the artifact's manifest.json, or a named file such as
  report.md), valid `LINK_EXPIRY_S` (7 days, the longest SigV4 allows); it carries the access key id and a
  signature, never the secret;
- otherwise (a local folder, no credentials to sign with): no link.
Every link also comes as text to copy: the artifact URI and the `rlhf store get` command that downloads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .store import MANIFEST, ArtifactStore

LINK_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class StoreLink:
    """How to reach one artifact: `uri` (the artifact), `file` (the object linked), `url` (http(s), or None),
    `how` (`direct` | `presigned` | None: what kind of URL), `command` (shell line that downloads the artifact)."""

    uri: str
    file: str
    url: str | None
    how: str | None
    command: str

    def markdown(self, label: str) -> str:
        """Lines for a markdown artifact: the link (and what kind it is), the URI and the download command."""
        if self.how == "presigned":
            opened = f"[{label}: {self.file}]({self.url}) (presigned link, valid {LINK_EXPIRY_S // 86400} days)"
        elif self.how == "direct":
            opened = f"[{label}: {self.file}]({self.url})"
        else:
            opened = f"{label}: no browser link (the store is not served over http); copy the URI or the command"
        return "\n".join([opened, "", f"URI: `{self.uri}`", "", f"Download: `{self.command}`"])


def get_command(store: ArtifactStore, uri: str) -> str:
    """`rlhf store get URI`, with the S3 endpoint in front when the store uses one (the command reads it from
    AWS_ENDPOINT_URL; credentials stay the user's own)."""
    prefix = f"AWS_ENDPOINT_URL={store.endpoint_url} " if store.endpoint_url and not store.is_local else ""
    return f"{prefix}rlhf store get {uri}"


def _browser_url(store: ArtifactStore, path: str) -> tuple[str | None, str | None]:
    """(url, how) for one object of the store, or (None, None)."""
    if store.is_local:
        return None, None
    if store.url.startswith(("http://", "https://")):
        return store.url + path[len(store.root):], "direct"
    try:
        url = store.fs.sign(path, expiration=LINK_EXPIRY_S)
    except Exception:  # noqa: BLE001 - no signing support, no credentials, unreachable endpoint: no link
        return None, None
    return (url, "presigned") if isinstance(url, str) and url.startswith(("http://", "https://")) else (None, None)


def artifact_link(store: ArtifactStore, kind: str, key: str, file: str = MANIFEST) -> StoreLink:
    """The link to `file` (default: the manifest, which lists every file) of artifact `<kind>/<key>`."""
    uri = store.uri(kind, key)
    url, how = _browser_url(store, f"{store.root}/{kind}/{key}/{file}")
    return StoreLink(uri=uri, file=file, url=url, how=how, command=get_command(store, uri))
