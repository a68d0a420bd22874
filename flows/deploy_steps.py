"""Deployment steps of our own, run by Prefect on the worker when a flow run starts (deployments/prefect.yaml).

Why not `set_working_directory: {directory: "{{ $RLHF_PROJECT_DIR }}"}`: `prefect deploy` fills every `{{ $VAR }}`
placeholder of the pull steps from the deploying machine's environment (prefect.utilities.templating.apply_values
resolves environment placeholders whatever values it is given), so the stored deployment held a laptop's path
and sent GPU workers there. A step that reads the variable when it runs reads the worker's.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR_VAR = "RLHF_PROJECT_DIR"


def set_project_dir(env_var: str = PROJECT_DIR_VAR) -> dict[str, str]:
    """Change into the folder named by the worker's `env_var` (a checkout of this repository, /opt/rlhf in the
    image), so relative store URLs and entrypoints resolve there. Returns {"directory": the folder} (the step's
    output, as Prefect's set_working_directory returns it); a missing variable or folder fails the flow run with
    one line saying which."""
    directory = os.environ.get(env_var)
    if not directory:
        raise RuntimeError(f"{env_var} is not set on this worker: point it at a checkout of rlhf-tasks "
                           f"(the worker image sets /opt/rlhf)")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise RuntimeError(f"{env_var}={directory}: no such folder on this worker")
    os.chdir(path)
    return {"directory": str(path)}
