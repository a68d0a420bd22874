"""Serve the four deployments from one process, without work pools or workers (local development):

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

Same names as deployments/prefect.yaml: rlhf-pipeline/on-demand, rlhf-pipeline/scheduled-retrain,
rlhf-sweep/sweep and train-stage/gpu (here it runs on this machine, so `execution.work_pool: gpu` works end to end locally).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import serve  # noqa: E402

from flows.pipeline import rlhf_pipeline  # noqa: E402
from flows.sweep import rlhf_sweep  # noqa: E402
from flows.train_stage import train_stage  # noqa: E402

RETRAIN_CRON = "0 3 * * *"


def deployments():
    return [
        rlhf_pipeline.to_deployment(name="on-demand", tags=["rlhf"]),
        rlhf_pipeline.to_deployment(name="scheduled-retrain", cron=RETRAIN_CRON, parameters={"until": "eval"},
                                    tags=["rlhf", "scheduled"]),
        rlhf_sweep.to_deployment(name="sweep", tags=["rlhf", "sweep"]),
        train_stage.to_deployment(name="gpu", tags=["rlhf", "gpu"]),
    ]


if __name__ == "__main__":
    serve(*deployments())
