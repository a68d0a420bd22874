"""Typed config: presets validate, overrides apply, bad input is one clear line naming the key."""
import pytest

from rlhf_tasks.config import PipelineConfig, load_config, parse_override
from rlhf_tasks.config.pipeline import PRESETS_DIR
from rlhf_tasks.errors import ConfigError

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_required_presets_ship():
    assert {"tiny", "smollm2-135m", "opt-1.3b", "opt-13b", "llama-2-7b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.data.sources, name


def test_gpu_presets_mirror_deepspeed_chat():
    cfg = load_config("opt-1.3b")
    assert (cfg.models.actor, cfg.models.reward) == ("facebook/opt-1.3b", "facebook/opt-350m")
    assert cfg.data.sources[0].path == "Dahoas/rm-static" and cfg.data.data_split == "2,4,4"
    big = load_config("opt-13b")
    assert big.ppo.actor.zero_stage == 3 and big.ppo.hybrid_engine == "deepspeed" and big.execution.num_procs == 8


def test_default_is_tiny_preset():
    assert load_config(None).models.actor == "tiny:llama"


def test_dotted_overrides():
    cfg = load_config(None, ["ppo.kl_coef=0.05", "sft.lora.r=8", "execution.work_pool=gpu",
                             "ppo.adaptive_kl=true", "sft.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.ppo.kl_coef == 0.05 and cfg.sft.lora.r == 8 and cfg.execution.work_pool == "gpu"
    assert cfg.ppo.adaptive_kl is True and cfg.sft.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, needle", [
    ("ppo.klcoef=0.1", "--set: ppo.klcoef: unknown key"),
    ("ppo.kl_coef=abc", "--set: ppo.kl_coef: Input should be a valid number"),
    ("sft.zero_stage=5", "--set: sft.zero_stage:"),
    ("data.data_split=1,2", "--set: data.data_split:"),
    ("bogus=1", "--set: bogus: unknown key"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"c.yaml: sft.epochs: Input should be a valid integer"):
        load_config(f)
    f.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=hello") == ("a.b", "hello")
    with pytest.raises(ConfigError):
        parse_override("no-equals")


def test_every_field_is_described():
    """The Prefect UI form shows these descriptions: none may be missing."""
    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, prefix + name + ".")

    walk(PipelineConfig, "")
    assert missing == []


def test_json_schema_renders():
    schema = PipelineConfig.model_json_schema()
    assert "ppo" in schema["properties"] and "$defs" in schema


# ---- cross-field rules: each a rejected example and an accepted neighbour ------------------------------------
def _rejects(overrides: list[str], *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert msg.startswith("--set: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_ppo_section_keeps_only_what_ppo_reads():
    """One place each for the learning rate, seed and checkpoint cadence; the supervised loop's fields are gone."""
    for key in ("epochs", "max_steps", "eval_every", "checkpoint_every", "seed", "max_seq_len", "grad_accum",
                "log_every", "keep_checkpoints", "optim.lr"):
        for model in ("actor", "critic"):
            _rejects([f"ppo.{model}.{key}=3"], f"ppo.{model}.{key}: unknown key")
    cfg = load_config(None, ["ppo.actor.zero_stage=3", "ppo.critic.optim.weight_decay=0.1", "ppo.keep_checkpoints=3",
                             "ppo.log_every=5", "ppo.actor.lora.r=4"])
    assert (cfg.ppo.actor.zero_stage, cfg.ppo.critic.optim.weight_decay) == (3, 0.1)
    assert (cfg.ppo.keep_checkpoints, cfg.ppo.log_every, cfg.ppo.actor.lora.r) == (3, 5, 4)


def test_ppo_engine_settings_match_the_mini_batch():
    from rlhf_tasks.config import PPOConfig
    from rlhf_tasks.ppo.engine import engine_config

    cfg = PPOConfig(prompt_batch_size=8, mini_batch_size=4, actor={"micro_batch_size": 2, "precision": "bf16",
                                                                   "optim": {"weight_decay": 0.1}})
    t = engine_config(cfg.actor, cfg.mini_batch_size, cfg.actor_lr)
    assert (t.micro_batch_size, t.grad_accum, t.precision) == (2, 2, "bf16")
    assert (t.optim.lr, t.optim.weight_decay) == (cfg.actor_lr, 0.1)
    capped = engine_config(cfg.critic, cfg.mini_batch_size, cfg.critic_lr)  # micro 8 > mini 4: one micro-batch
    assert (capped.micro_batch_size, capped.grad_accum, capped.optim.lr) == (4, 1, cfg.critic_lr)


def test_ppo_buffer_is_whole_mini_batches():
    _rejects(["ppo.mini_batch_size=12"], "ppo.prompt_batch_size x ppo.generation_batches (16 x 1) = 16 rows",
             "multiple of ppo.mini_batch_size (12)")
    _rejects(["ppo.prompt_batch_size=4", "ppo.generation_batches=3", "ppo.mini_batch_size=8"], "(4 x 3) = 12 rows")
    assert load_config(None, ["ppo.prompt_batch_size=4", "ppo.generation_batches=3",
                              "ppo.mini_batch_size=6"]).ppo.mini_batch_size == 6


def test_oversized_ppo_mini_batch():
    _rejects(["ppo.mini_batch_size=32"], "ppo.mini_batch_size (32) is larger than one experience buffer")
    assert load_config(None, ["ppo.mini_batch_size=16"]).ppo.mini_batch_size == 16


@pytest.mark.parametrize("model", ["actor", "critic"])
def test_ppo_mini_batch_is_whole_micro_batches(model):
    _rejects([f"ppo.{model}.micro_batch_size=3"],
             f"ppo.mini_batch_size (8) must be a whole number of ppo.{model}.micro_batch_size (3) micro-batches")
    assert load_config(None, [f"ppo.{model}.micro_batch_size=4"]).ppo.mini_batch_size == 8
    # larger than the mini-batch: capped at it (one micro-batch per update)
    assert getattr(load_config(None, [f"ppo.{model}.micro_batch_size=16"]).ppo, model).micro_batch_size == 16


def test_ppo_rules_hold_for_python_callers():
    from pydantic import ValidationError

    from rlhf_tasks.config import PPOConfig

    with pytest.raises(ValidationError, match="multiple of ppo.mini_batch_size"):
        PPOConfig(prompt_batch_size=8, mini_batch_size=3)
    cfg = PPOConfig(prompt_batch_size=8, mini_batch_size=4)
    with pytest.raises(ValidationError, match="multiple of ppo.mini_batch_size"):
        cfg.mini_batch_size = 3  # assignment is validated too


def test_ema_needs_a_plain_actor():
    _rejects(["ppo.ema_decay=0.99", "ppo.actor.lora.r=4"], "ppo.ema_decay with LoRA on the actor")
    assert load_config(None, ["ppo.ema_decay=0.99"]).ppo.ema_decay == 0.99
    assert load_config(None, ["ppo.ema_decay=0.99", "ppo.critic.lora.r=4"]).ppo.critic.lora.r == 4


def test_tiny_model_heads_divide_the_hidden_size():
    _rejects(["models.tiny.hidden_size=66"],
             "models.tiny.hidden_size (66) must be a multiple of models.tiny.num_heads (4)")
    assert load_config(None, ["models.tiny.hidden_size=72"]).models.tiny.hidden_size == 72
    # llama's rotary embeddings need an even head size; opt has none
    _rejects(["models.tiny.hidden_size=60"], "= 15 must be even for tiny:llama")
    assert load_config(None, ["models.tiny.hidden_size=60", "models.actor=tiny:opt"]).models.tiny.hidden_size == 60


@pytest.mark.parametrize("path", ["sft", "reward", "ppo.actor", "ppo.critic"])
def test_fp16_on_cpu(path):
    from rlhf_tasks.config import rules

    _rejects(["execution.device=cpu", f"{path}.precision=fp16"], f"{path}.precision: fp16 needs a GPU")
    assert load_config(None, ["execution.device=cpu", f"{path}.precision=bf16"]).execution.device == "cpu"
    on_gpu = load_config(None, ["execution.device=cuda", f"{path}.precision=fp16"])
    assert rules.device_rules(on_gpu, "cuda") == []
    # device auto: decided before launch, once the jobs' device is known
    auto = load_config(None, [f"{path}.precision=fp16"])
    assert [v.fields[0] for v in rules.device_rules(auto, "cpu")] == [f"{path}.precision"]
    with pytest.raises(ConfigError, match=f"{path}.precision: fp16"):
        rules.raise_first(rules.device_rules(auto, "cpu"))


def test_deepspeed_hybrid_engine_rules():
    from rlhf_tasks.config import rules

    _rejects(["ppo.hybrid_engine=deepspeed", "ppo.inference_tp_size=2"],
             "ppo.inference_tp_size > 1 needs ppo.actor.zero_stage=3, got 0")
    assert load_config(None, ["ppo.hybrid_engine=deepspeed", "ppo.inference_tp_size=2",
                              "ppo.actor.zero_stage=3"]).ppo.inference_tp_size == 2
    _rejects(["execution.device=cpu", "ppo.hybrid_engine=deepspeed"], "ppo.hybrid_engine: deepspeed needs CUDA")
    auto = load_config(None, ["ppo.hybrid_engine=deepspeed"])
    assert [v.fields[0] for v in rules.device_rules(auto, "cpu")] == ["ppo.hybrid_engine"]
    assert rules.device_rules(auto, "cuda") == []


def test_timeout_must_be_meaningful():
    _rejects(["execution.timeout_s=1"], "execution.timeout_s: Input should be greater than or equal to 60")
    assert load_config(None, ["execution.timeout_s=60"]).execution.timeout_s == 60


@pytest.mark.parametrize("key", ["sft.micro_batch_size", "reward.grad_accum", "ppo.prompt_batch_size",
                                 "ppo.actor.micro_batch_size", "eval.batch_size"])
def test_absurd_batch_sizes(key):
    _rejects([f"{key}=65537"], f"{key}: Input should be less than or equal to 65536")
    assert load_config(None, [f"{key}=64"]) is not None


def test_one_step_fits_the_rows_sources_allow():
    """With max_rows on every source, a phase has at most their sum: a step needing more fails at load."""
    rows = "data.sources=[{path: demo, max_rows: 20}]"
    _rejects([rows, "sft.grad_accum=2"], "sft.micro_batch_size x sft.grad_accum x execution.num_procs x "
             "execution.num_nodes = 32 rows per sft step", "at most 20 training rows")
    _rejects([rows, "execution.num_procs=2", "sft.micro_batch_size=8", "reward.micro_batch_size=8"],
             "ppo.prompt_batch_size x ppo.generation_batches x execution.num_procs x execution.num_nodes = 32 rows "
             "per ppo step (2 processes)")
    assert load_config(None, [rows]).data.sources[0].max_rows == 20
    # a phase given no share is empty on purpose; sft_only sources feed only sft
    assert load_config(None, [rows, "sft.grad_accum=2", "data.data_split=0,5,5"]) is not None
    big = "data.sources=[{path: demo, max_rows: 20}, {path: demo, max_rows: 100, sft_only: true}]"
    assert load_config(None, [big, "sft.grad_accum=2"]).sft.grad_accum == 2
    _rejects([big, "reward.grad_accum=2"], "at most 20 training rows")


def test_data_fit_with_counted_rows():
    from rlhf_tasks.config import rules

    cfg = load_config(None)
    assert rules.data_fit_rules(cfg, {"sft": 16, "reward": 16, "ppo": 16}, "the data") == []
    bad = rules.data_fit_rules(cfg, {"sft": 15, "ppo": 100}, "the data")
    assert [v.message for v in bad] == ["sft.micro_batch_size x sft.grad_accum x execution.num_procs x "
                                        "execution.num_nodes = 16 rows per sft step, but the data give the sft "
                                        "phase at most 15 training rows"]
    assert "sft.grad_accum" in bad[0].fields


def test_rule_errors_name_their_origin(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  prompt_batch_size: 16\n  mini_batch_size: 12\n")
    with pytest.raises(ConfigError, match=r"^.*c.yaml: ppo.prompt_batch_size x ppo.generation_batches"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^--set: ppo.prompt_batch_size"):
        load_config(f, ["ppo.generation_batches=1"])  # a --set of a field the rule names
    with pytest.raises(ConfigError, match=r"c.yaml: ppo.prompt_batch_size"):
        load_config(f, ["ppo.kl_coef=0.2"])  # an unrelated --set: the file is the origin
