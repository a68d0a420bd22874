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
