"""Fingerprint a finished demo run: sha256 of every weights file and of the metrics with timing fields dropped.

A refactor must keep results bit-identical; run this on the store before and after and diff the output:
    python scripts/demo_fingerprint.py rlhf-store/last-run.json > before.json
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

# Fields that measure the machine or name where the run lay (seconds, throughput, memory, store paths and keys),
# not what it computed: keys change with the code version, paths with the store.
_TIMING = re.compile(r"(wall|_s$|per_s|tokens_per_s|peak_mem|time|seconds|elapsed|created|uri|inputs|path|key)")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not _TIMING.search(k)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def fingerprint(run_summary: Path) -> dict:
    record = json.loads(run_summary.read_text())
    out = {}
    for stage, entry in record["stages"].items():
        folder = Path(entry["uri"].removeprefix("file://"))
        files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                 for p in sorted(folder.rglob("*.safetensors"))}
        metrics = folder / "metrics.json"
        m = _strip(json.loads(metrics.read_text())) if metrics.exists() else None
        out[stage] = {"weights": files,
                      "metrics": hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]}
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprint(Path(sys.argv[1] if len(sys.argv) > 1 else "rlhf-store/last-run.json")), indent=1))
