#!/usr/bin/env python
"""Regenerate the demo dataset shipped in the package (rlhf_tasks/data/demo_data/demo.jsonl).

The task and its gold reward are described in rlhf_tasks/data/demo.py. Deterministic: the same rows and seed give
byte-identical output, so the data stage key (which hashes the file) only changes when the task does.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_tasks.data import demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=demo.DEFAULT_ROWS, help="number of preference pairs")
    ap.add_argument("--seed", type=int, default=demo.DEFAULT_SEED, help="generator seed")
    ap.add_argument("--out", default=str(demo.DATA_FILE), help="output JSONL file")
    args = ap.parse_args()
    rows = demo.generate(args.rows, args.seed)
    path = demo.write_jsonl(rows, args.out)
    print(path)
    print(json.dumps(demo.stats(rows), indent=1))


if __name__ == "__main__":
    main()
