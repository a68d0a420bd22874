"""Entry point of every stage job: `python -m rlhf_tasks.stage_main SPEC.json` (under a launcher or alone).

It imports the stage's module and calls its `run(spec)`, which reads inputs from the store and commits the
output artifact (rank 0). Nothing here imports Prefect: a job talks to the rest only through the spec and the store.
Bad input found inside the job: one line on stderr, the same line in `<run_dir>/input_error.txt`, exit 2. The file
is what the launcher goes by: under torchrun or the deepspeed launcher the job's exit code is the launcher's own.
"""
import os
import sys
from pathlib import Path

from .errors import UserError
from .stages import STAGE_DEFS, StageSpec

INPUT_ERROR_FILE = "input_error.txt"


def write_input_error(run_dir: str | Path, message: str) -> None:
    """The one-line message where the launcher looks for it. Every rank may find the same bad input: each writes
    its own temporary file and renames it into place, so the file always holds one whole line."""
    path = Path(run_dir) / INPUT_ERROR_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(message + "\n")
    os.replace(tmp, path)


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
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if spec.run_dir:
            write_input_error(spec.run_dir, message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return UserError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
