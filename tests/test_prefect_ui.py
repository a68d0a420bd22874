"""What a person sees in the Prefect UI, checked without a browser: the parameter form's schema (a description on
every parameter, placeholders that survive markdown, the ZeRO stage as a bounded integer), the errors a form value
produces, run names, the deployment's pull step."""
from __future__ import annotations

import re

import pytest

from rlhf_tasks.config import load_config
from rlhf_tasks.config._base import markdown_safe
from rlhf_tasks.errors import ConfigError

_CODE_SPAN = re.compile(r"`[^`]*`")


def _descriptions(node, where=""):
    """(location, description) of every description in a JSON schema."""
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            yield where, node["description"]
        for k, v in node.items():
            yield from _descriptions(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _descriptions(v, f"{where}[{i}]")


def _flow_schemas():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import rlhf_pipeline
    from flows.sweep import rlhf_sweep
    from flows.train_stage import train_stage

    return {f.name: parameter_schema(f.fn).model_dump() for f in (rlhf_pipeline, rlhf_sweep, train_stage)}


def test_every_flow_parameter_has_a_description_and_overrides_shows_its_syntax():
    for name, schema in _flow_schemas().items():
        for param, prop in schema["properties"].items():
            assert len(prop.get("description") or "") > 20, f"{name}.{param} has no description"
    pipeline = _flow_schemas()["rlhf-pipeline"]["properties"]
    assert "`KEY=VALUE`" in pipeline["overrides"]["description"]
    assert "`ppo.kl_coef=0.05`" in pipeline["overrides"]["description"]
    assert "`eval`" in pipeline["until"]["description"] and "`dpo`" in pipeline["until"]["description"]


def test_no_description_holds_an_angle_bracket_the_markdown_renderer_would_drop():
    """The UI renders descriptions as markdown, where `<work_pool>` outside a code span is an HTML tag."""
    seen = 0
    for schema in _flow_schemas().values():
        for where, text in _descriptions(schema):
            outside = _CODE_SPAN.sub("", text)
            assert "<" not in outside and ">" not in outside, f"{where}: {text!r}"
            seen += "&lt;" in text
    assert seen >= 2  # e.g. execution.train_deployment's train-stage/<work_pool>
    train = _flow_schemas()["rlhf-pipeline"]["definitions"]["ExecutionConfig"]["properties"]["train_deployment"]
    assert "train-stage/&lt;work_pool&gt;" in train["description"]


def test_markdown_safe_keeps_code_spans_literal():
    assert markdown_safe("default: train-stage/<pool>") == "default: train-stage/&lt;pool&gt;"
    assert markdown_safe("`<a>` and <b>") == "`<a>` and &lt;b&gt;"
    assert markdown_safe("x -> y") == "x -&gt; y"


def test_zero_stage_is_a_bounded_integer_not_an_integer_enum():
    schema = _flow_schemas()["rlhf-pipeline"]["definitions"]
    zero = schema["PPOModelConfig"]["properties"]["zero_stage"]
    assert zero["type"] == "integer" and (zero["minimum"], zero["maximum"]) == (0, 3) and "enum" not in zero
    assert load_config(None, ["sft.zero_stage=2"]).sft.zero_stage == 2
    for bad in ("4", "-1", "true", "'2'"):
        with pytest.raises(ConfigError, match="sft.zero_stage"):
            load_config(None, [f"sft.zero_stage={bad}"])


def test_an_overrides_typo_is_reported_as_overrides():
    from flows.pipeline import _config_param

    with pytest.raises(ConfigError) as e:
        _config_param(None, ["ppo.klcoef=0.05"])
    assert str(e.value) == "overrides: ppo.klcoef: unknown key"
    with pytest.raises(ConfigError, match=r"^overrides: ppo.kl_coef: Input should be greater"):
        _config_param(None, ["ppo.kl_coef=-1"])
    with pytest.raises(ConfigError, match=r"^overrides 'ppo': expected KEY=VALUE"):
        _config_param(None, ["ppo"])
    with pytest.raises(ConfigError, match=r"^parameters.config: bogus: unknown key"):  # the form's own field
        _config_param({"bogus": 1}, ["ppo.kl_coef=0.2"])
    with pytest.raises(ConfigError, match=r"^--set: ppo.klcoef: unknown key"):  # the CLI keeps its own name
        load_config(None, ["ppo.klcoef=0.05"])


def test_run_names_say_what_differs_including_until():
    from flows.stage_loop import looks_generated, run_name

    cfg = load_config(None, ["ppo.kl_coef=0.05"])
    assert run_name(cfg) == run_name(cfg, "eval") and run_name(cfg).startswith("demo-kl_coef0.05-")
    assert run_name(cfg, "reward").startswith("demo-kl_coef0.05-until-reward-")
    other_store = load_config(None, ["ppo.kl_coef=0.05", "store.url=/elsewhere"])
    assert run_name(other_store) != run_name(cfg)  # the hash covers the whole config
    assert looks_generated("brave-otter") and looks_generated(None) and looks_generated("")
    assert not looks_generated("kl-sweep-1") and not looks_generated("Baseline") and not looks_generated("my run")


def test_flow_run_names_keep_a_given_name_and_make_generated_ones_unique():
    from flows.stage_loop import flow_run_name

    def bad_parameters():
        raise ConfigError("overrides: ppo.klcoef: unknown key")

    run_id = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    assert flow_run_name("kl sweep, take 2", run_id, lambda: "demo-x", "rlhf") == "kl sweep, take 2"
    assert flow_run_name("brave-otter", run_id, lambda: "demo-sweep-9ab4f6", "rlhf") == "demo-sweep-9ab4f6-0a1b2c"
    assert flow_run_name(None, run_id, bad_parameters, "rlhf-sweep") == "rlhf-sweep-0a1b2c"
    other = flow_run_name("brave-otter", "ffffffff-4e5f-6789-abcd-ef0123456789", lambda: "demo-sweep-9ab4f6", "x")
    assert other != flow_run_name("brave-otter", run_id, lambda: "demo-sweep-9ab4f6", "x")



def test_a_pending_deepspeed_compile_is_announced_before_it_starts(tmp_path, monkeypatch, capsys):
    """A job about to compile a DeepSpeed op says so in one `[build]` line (an empty extensions folder); with the
    op compiled already it says nothing; the flow's relay turns the line into a console line (and a progress
    artifact inside Prefect)."""
    from flows import observe
    from rlhf_tasks.training.op_builds import COMM_OPS, announce_pending_builds

    shared = announce_pending_builds(COMM_OPS)  # the suite's extensions folder: compiled by earlier jobs
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lines = []
    assert announce_pending_builds(COMM_OPS, lines.append) == ["deepspeed_shm_comm"]
    assert lines == [f"[build] compiling DeepSpeed op deepspeed_shm_comm (once per machine, a few minutes on a small "
                     f"CPU; kept in {tmp_path / 'ext'})"]
    assert shared in ([], ["deepspeed_shm_comm"])
    echoed = []
    observe.set_console(echoed.append)
    try:
        observe.StageLog("sft", tmp_path)(lines[0] + "\n")
    finally:
        observe.set_console(None)
    assert echoed == ["  sft: compiling DeepSpeed op deepspeed_shm_comm (once per machine, a few minutes on a small "
                      f"CPU; kept in {tmp_path / 'ext'})"]
