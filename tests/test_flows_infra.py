"""Static checks of the deployment and infrastructure files (no server, no Docker, no cluster): they parse, name
what the code expects, and the GPU job template renders `gpu_count` into the pod's nvidia.com/gpu limit."""
from __future__ import annotations

import json
import runpy

import yaml

from conftest import ROOT


def test_prefect_yaml_deployments_and_entrypoints():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"on-demand", "scheduled-retrain", "sweep", "gpu"}
    assert deps["gpu"]["work_pool"]["name"] == "gpu"
    assert deps["scheduled-retrain"]["schedules"][0]["cron"]
    names = {load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False).name for d in deps.values()}
    assert names == {"rlhf-pipeline", "rlhf-sweep", "train-stage"}


def test_pipeline_parameters_are_the_typed_config_form():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import rlhf_pipeline

    schema = parameter_schema(rlhf_pipeline.fn).model_dump()
    assert set(schema["properties"]) == {"config", "until", "overrides", "stage_plans", "run_folder"}
    defs = schema["definitions"]
    assert {"PipelineConfig", "PPOConfig", "ExecutionConfig"} <= set(defs)
    assert "kl_coef" in defs["PPOConfig"]["properties"]
    assert schema["properties"]["config"]["default"]["experiment"] == "demo"  # the tiny preset


def test_sweep_parameters_are_the_typed_config_and_grid():
    from prefect.utilities.callables import parameter_schema

    from flows.sweep import rlhf_sweep

    schema = parameter_schema(rlhf_sweep.fn).model_dump()
    assert set(schema["properties"]) == {"config", "grid", "until", "overrides", "variant_plans", "run_folder"}
    assert {"PipelineConfig", "GridAxis"} <= set(schema["definitions"])
    assert set(schema["definitions"]["GridAxis"]["properties"]) == {"key", "values"}
    assert schema["properties"]["grid"]["default"] == [{"key": "ppo.kl_coef", "values": [0.05, 0.1]}]
    assert all(schema["properties"][p].get("description") for p in schema["properties"])


def test_overrides_parameter_and_run_names():
    from flows.pipeline import _config_param

    cfg = _config_param(None, ["ppo.kl_coef=0.02", "execution.work_pool=gpu"])
    assert cfg.ppo.kl_coef == 0.02 and cfg.execution.work_pool == "gpu"
    assert _config_param({"experiment": "x"}).experiment == "x"


def test_serve_entry_point_builds_the_same_deployments():
    mod = runpy.run_path(str(ROOT / "deployments" / "serve.py"), run_name="not_main")
    got = {(d.flow_name, d.name) for d in mod["deployments"]()}
    assert got == {("rlhf-pipeline", "on-demand"), ("rlhf-pipeline", "scheduled-retrain"), ("rlhf-sweep", "sweep"),
                   ("train-stage", "gpu")}


def test_gpu_job_template_maps_gpu_count_selector_and_tolerations():
    from prefect.utilities.templating import apply_values

    t = json.loads((ROOT / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    props = t["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | {"gpu_count": 4}
    job = apply_values(t["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == props["node_selector"]["default"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["name"] == "prefect-job" and pod["restartPolicy"] == "Never"


def test_compose_stack_has_server_store_and_workers():
    stack = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    services = stack["services"]
    assert {"prefect-server", "minio", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    assert "--pool cpu" in services["worker-cpu"]["command"] and "--pool gpu" in services["worker-gpu"]["command"]
    assert services["worker-cpu"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "pip install -e ." in dockerfile and "RLHF_PROJECT_DIR=/opt/rlhf" in dockerfile
