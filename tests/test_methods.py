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


def test_dpo_plans_its_stage_from_the_pairs_and_sft_and_reuses_what_ppo_shares(empty_store):
    ppo, dpo = load_config(None), load_config(None, ["method=dpo"])
    plans = stages.plan(dpo, empty_store)
    assert [p.stage for p in plans] == list(pipeline_stages(dpo)) == ["data", "sft", "reward", "dpo", "eval"]
    assert inputs_of(plans) == {"data": [], "sft": ["data"], "reward": ["data"], "dpo": ["data", "sft"],
                                "eval": ["data", "sft", "reward", "dpo"]}
    ppo_keys = {p.stage: p.key for p in stages.plan(ppo, empty_store)}
    dpo_keys = {p.stage: p.key for p in plans}
    assert {s: dpo_keys[s] for s in ("data", "sft", "reward")} == {s: ppo_keys[s] for s in ("data", "sft", "reward")}
    assert dpo_keys["eval"] != ppo_keys["eval"]  # it compares another policy
    assert plans[3].key_inputs["config"]["dpo"]["beta"] == dpo.dpo.beta  # the dpo section is the stage's slice
    # a dpo setting changes the dpo key and nothing upstream; a ppo setting changes nothing of a dpo run
    other = {p.stage: p.key for p in stages.plan(load_config(None, ["method=dpo", "dpo.beta=0.3"]), empty_store)}
    assert other["dpo"] != dpo_keys["dpo"] and other["sft"] == dpo_keys["sft"]
    same = {p.stage: p.key for p in stages.plan(load_config(None, ["method=dpo", "ppo.kl_coef=0.3"]), empty_store)}
    assert same == dpo_keys
    line = stages.method_summary(dpo, plans)
    assert line.startswith("method dpo: data -> sft -> reward -> dpo -> eval; dpo trains on the reward phase's")
    assert "the reward model only scores evaluation's answers" in line


def test_until_dpo_and_a_stage_dpo_does_not_run(empty_store):
    cfg = load_config(None, ["method=dpo"])
    assert [p.stage for p in stages.plan(cfg, empty_store, until="dpo")] == ["data", "sft", "reward", "dpo"]
    with pytest.raises(ConfigError, match="--until: stage 'ppo' is not part of method=dpo"):
        stages.plan(cfg, empty_store, until="ppo")


def test_the_fit_checks_ask_only_the_methods_stages():
    """dpo trains on the reward phase's pairs: its batch is checked against that phase; the ppo section's
    batch is not checked in a dpo run (nor the dpo section's in a ppo run)."""
    capped = ["data.sources=[{path: demo, max_rows: 100}]"]
    with pytest.raises(ConfigError, match="rows per dpo step, but data.sources max_rows give the reward phase"):
        load_config(None, [*capped, "method=dpo", "dpo.micro_batch_size=128"])
    load_config(None, [*capped, "method=dpo", "ppo.prompt_batch_size=128", "ppo.mini_batch_size=8"])
    load_config(None, [*capped, "dpo.micro_batch_size=128"])
