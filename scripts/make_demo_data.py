#!/usr/bin/env python
"""Regenerate a task dataset shipped in the package: rlhf_tasks/data/demo_data/demo.jsonl (--task demo, the
default) or rlhf_tasks/data/constraints_data/constraints.jsonl (--task constraints).

The tasks and their gold rewards are described in rlhf_tasks/data/demo.py and rlhf_tasks/data/constraints.py.
Deterministic: the same rows and seed give byte-identical output, so the data stage key (which hashes the file)
only changes when the task does.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_tasks.data import constraints, demo  # noqa: E402

TASKS = {"demo": demo, "constraints": constraints}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="demo", help="which shipped task")
    ap.add_argument("--rows", type=int, help="number of preference pairs (default: the task's)")
    ap.add_argument("--seed", type=int, help="generator seed (default: the task's)")
    ap.add_argument("--out", help="output JSONL file (default: the shipped file)")
    args = ap.parse_args()
    task = TASKS[args.task]
    rows = task.generate(args.rows or task.DEFAULT_ROWS, task.DEFAULT_SEED if args.seed is None else args.seed)
    path = demo.write_jsonl(rows, args.out or task.DATA_FILE)  # one writer for every shipped task
    print(path)
    print(json.dumps(task.stats(rows), indent=1))


if __name__ == "__main__":
    main()
