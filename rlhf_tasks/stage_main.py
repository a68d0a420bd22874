"""Entry point of every stage job: `python -m rlhf_tasks.stage_main SPEC.json` (under a launcher or alone).

It imports the stage's module and calls its `run(spec)`, which reads inputs from the store and commits the
output artifact (rank 0). Nothing here imports Prefect: a job talks to the rest only through the spec and the store.
"""
import sys

from .errors import UserError
from .stages import STAGE_DEFS, StageSpec


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib

    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks.stage_main")
    ap.add_argument("spec", help="stage spec JSON file")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)
    spec = StageSpec.from_file(args.spec)
    module = importlib.import_module(STAGE_DEFS[spec.stage].module)
    try:
        module.run(spec)
    except UserError as e:  # bad input found inside the job: one line, exit 2, like the CLI
        print(f"error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
