"""The `method` field picks the pipeline's stages (rlhf_tasks/config/methods.py): the plan walks the method's
stages, each StagePlan names the URIs of its inputs (what a scheduler waits for), and `--until` takes one of them.
Plans only: nothing runs."""
from __future__ import annotations

import pytest

from rlhf_tasks import stages
from rlhf_tasks.config import load_config
from rlhf_tasks.config.methods import METHODS, pipeline_stages
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.store import ArtifactStore


@pytest.fixture
def empty_store(tmp_path):
    return ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def inputs_of(plans) -> dict[str, list[str]]:
    return {p.stage: list(p.input_uris) for p in plans}


def test_ppo_is_the_default_and_plans_its_five_stages(empty_store):
    cfg = load_config(None)
    assert cfg.method == "ppo" and set(METHODS) >= {"ppo"}
    plans = stages.plan(cfg, empty_store)
    assert [p.stage for p in plans] == list(pipeline_stages(cfg)) == ["data", "sft", "reward", "ppo", "eval"]
    assert inputs_of(plans) == {"data": [], "sft": ["data"], "reward": ["data"], "ppo": ["data", "sft", "reward"],
                                "eval": ["data", "sft", "reward", "ppo"]}
    uri = {p.stage: p.uri for p in plans}
    for p in plans:  # the URIs of a stage's inputs are those its upstream plans will commit
        assert p.input_uris == {n: uri[n] for n in p.input_uris}
        assert p.key_inputs["inputs"] == {n: u.rsplit("/", 1)[-1] for n, u in p.input_uris.items()}


def test_until_names_a_stage_of_the_method(empty_store):
    cfg = load_config(None)
    assert [p.stage for p in stages.plan(cfg, empty_store, until="sft")] == ["data", "sft"]
    with pytest.raises(ConfigError, match="--until: unknown stage 'rm'"):
        stages.plan(cfg, empty_store, until="rm")


def test_an_unknown_method_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method=sppo"])
    assert str(e.value).startswith("--set: method: Input should be") and "'ppo'" in str(e.value)
