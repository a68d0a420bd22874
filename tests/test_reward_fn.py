"""Programmatic rewards (`ppo.reward_fn`, `eval.reward_fn`): loading, the row fields a function gets, its code in
the stage key (a change to the function re-runs what scores with it, a docstring does not), the config rules and
preflight's one-line errors."""
import textwrap

import pytest

from rlhf_tasks.config import load_config
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.reward_fn import code_identity, load_reward_fn
from rlhf_tasks.stages import stage_key_inputs
from rlhf_tasks.store import compute_key


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A user package on sys.path: myrewards/{__init__,scoring,helpers,unused}.py."""
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def bonus(text):\n    return 0.5 if 'cat' in text else 0.0\n")
    (pkg / "unused.py").write_text("X = 1\n")
    (pkg / "scoring.py").write_text(textwrap.dedent('''\
        """Scores."""
        from .helpers import bonus


        def length(prompt, response):
            return float(len(response.split())) + bonus(response)


        def against_reference(prompt, response, chosen, gold=None):
            return float(response == chosen)


        def everything(prompt, response, **fields):
            return float(len(fields))
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    import sys

    for name in [m for m in sys.modules if m == "myrewards" or m.startswith("myrewards.")]:
        del sys.modules[name]


def test_load_and_call_with_the_fields_the_function_names(user_pkg):
    fields = {"chosen": "a cat", "rejected": "no", "gold": "demo", "source": "s", "row": 3}
    assert load_reward_fn("myrewards.scoring:length")("p", "a cat sat", fields) == 3.5
    assert load_reward_fn("myrewards.scoring:against_reference")("p", "a cat", fields) == 1.0
    assert load_reward_fn("myrewards.scoring:everything")("p", "x", fields) == 5.0
    from rlhf_tasks.data.demo import gold_score

    fn = load_reward_fn("rlhf_tasks.data.demo:gold_score")
    assert fn("Describe the cat.", "the cat is warm and calm", fields) == gold_score("Describe the cat.",
                                                                                     "the cat is warm and calm")


def test_load_errors_are_one_line(user_pkg):
    with pytest.raises(ConfigError, match=r"^ppo.reward_fn: nope.x:f: no module named 'nope'$"):
        load_reward_fn("nope.x:f", "ppo.reward_fn")
    with pytest.raises(ConfigError, match=r"module 'myrewards.scoring' has no attribute 'lenght'"):
        load_reward_fn("myrewards.scoring:lenght", "ppo.reward_fn")
    (user_pkg / "broken.py").write_text("raise RuntimeError('no config here')\n")
    with pytest.raises(ConfigError, match=r"importing myrewards.broken failed \(RuntimeError: no config here\)"):
        load_reward_fn("myrewards.broken:f", "eval.reward_fn")
    (user_pkg / "constant.py").write_text("F = 3\n")
    with pytest.raises(ConfigError, match="'F' is not callable"):
        load_reward_fn("myrewards.constant:F", "ppo.reward_fn")
    (user_pkg / "words.py").write_text("def f(prompt, response):\n    return 'many'\n")
    with pytest.raises(ConfigError, match="returned 'many'.*must return a number"):
        load_reward_fn("myrewards.words:f")("p", "r")


def test_code_identity_is_the_modules_import_closure(user_pkg):
    ident = code_identity("myrewards.scoring:length", "ppo.reward_fn")
    assert sorted(ident["code"]) == ["myrewards/__init__.py", "myrewards/helpers.py", "myrewards/scoring.py"]
    demo = code_identity("rlhf_tasks.data.demo:gold_score", "ppo.reward_fn")["code"]
    assert "rlhf_tasks/data/demo.py" in demo and "rlhf_tasks/ppo/trainer.py" not in demo
    with pytest.raises(ConfigError, match="no module named 'myrewards.nothere'"):
        code_identity("myrewards.nothere:f", "ppo.reward_fn")


def _grpo_key(overrides):
    cfg = load_config(None, ["ppo.reward=fn", "ppo.reward_fn=myrewards.scoring:length", *overrides])
    return compute_key(stage_key_inputs(cfg, "grpo", {"data": "d", "sft": "s", "reward": "r"}))


def test_the_function_code_enters_the_key_of_what_scores_with_it(user_pkg):
    base = _grpo_key([])
    (user_pkg / "scoring.py").write_text((user_pkg / "scoring.py").read_text().replace('"""Scores."""',
                                                                                       '"""Other words."""'))
    assert _grpo_key([]) == base  # a docstring is not code
    (user_pkg / "helpers.py").write_text("def bonus(text):\n    return 0.7 if 'cat' in text else 0.0\n")
    changed = _grpo_key([])
    assert changed != base  # an imported helper changed
    (user_pkg / "unused.py").write_text("X = 2\n")
    assert _grpo_key([]) == changed  # a module it does not import did not
    # only the stages that score with it: the default (rm) step 3 and eval without eval.reward_fn have no entry
    cfg = load_config(None, [])
    assert "reward_fn" not in stage_key_inputs(cfg, "ppo", {"data": "d", "sft": "s", "reward": "r"})
    eval_cfg = load_config(None, ["eval.reward_fn=myrewards.scoring:length"])
    ki = stage_key_inputs(eval_cfg, "eval", {"data": "d", "sft": "s", "reward": "r", "ppo": "p"})
    assert ki["reward_fn"]["ref"] == "myrewards.scoring:length"


def test_critic_fields_are_not_in_a_critic_free_key():
    inputs = {"data": "d", "sft": "s", "reward": "r"}

    def key(stage, overrides):
        return compute_key(stage_key_inputs(load_config(None, overrides), stage, inputs))

    assert key("grpo", ["ppo.critic_lr=0.5", "ppo.vf_coef=0.3", "ppo.critic.zero_stage=3"]) == key("grpo", [])
    assert key("ppo", ["ppo.critic_lr=0.5"]) != key("ppo", [])
    assert key("grpo", []) != key("rloo", [])  # the method is the stage, and the stage enters the key
    assert key("grpo", ["ppo.kl_in=loss"]) != key("grpo", [])


@pytest.mark.parametrize("overrides, message", [
    (["ppo.reward=fn"], "ppo.reward=fn needs ppo.reward_fn"),
    (["ppo.reward_fn=rlhf_tasks.data.demo:gold_score"], "is unused with ppo.reward=rm"),
    (["ppo.reward=fn", "ppo.reward_fn=rlhf_tasks.data.demo"], "is not package.module:callable"),
    (["eval.reward_fn=gold_score"], "is not package.module:callable"),
    (["ppo.kl_in=loss", "ppo.adaptive_kl=true"], "with ppo.kl_in=loss the KL term's coefficient is the fixed"),
    (["ppo.samples_per_prompt=3", "ppo.mini_batch_size=32"],
     "(16 x 3 x 1) = 48 rows must be a multiple of ppo.mini_batch_size (32)"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_step3_rules_and_the_reward_model_need():
    from rlhf_tasks.config.rules import needs_reward_model, step3_rules

    ppo = load_config(None, ["ppo.reward=fn", "ppo.reward_fn=rlhf_tasks.data.demo:gold_score"]).ppo
    assert [v.message for v in step3_rules("grpo", ppo)] == [
        "method=grpo needs ppo.samples_per_prompt >= 2 (its baseline is the other answers to the same prompt), got 1"]
    assert step3_rules("ppo", ppo) == []
    assert not needs_reward_model("grpo", ppo) and not needs_reward_model("rloo", ppo)
    assert needs_reward_model("ppo", ppo)  # PPO's critic starts from the reward model by default
    assert not needs_reward_model("ppo", ppo.model_copy(update={"critic_from_reward": False}))
    assert needs_reward_model("grpo", ppo.model_copy(update={"reward": "rm+fn"}))


def test_preflight_refuses_a_missing_function_before_anything_runs(tmp_path):
    from rlhf_tasks.preflight import check_reward_fns

    check_reward_fns(load_config(None, ["ppo.reward=fn", "ppo.reward_fn=rlhf_tasks.data.demo:gold_score"]))
    with pytest.raises(ConfigError, match="^ppo.reward_fn: rlhf_tasks.data.demo:nope: module"):
        check_reward_fns(load_config(None, ["ppo.reward=fn", "ppo.reward_fn=rlhf_tasks.data.demo:nope"]))
    with pytest.raises(ConfigError, match="^eval.reward_fn: x.y:z: no module named 'x'"):
        check_reward_fns(load_config(None, ["eval.reward_fn=x.y:z"]))
