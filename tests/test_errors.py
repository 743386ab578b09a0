"""Bad input gets a library exception naming the input, the value and the fix (never a raw
error from deep inside torch, safetensors or json). Capture-side inputs: test_capture.py;
the command line: test_cli.py."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_batch, make_model

import lorafa_fx
from lorafa_fx import AdapterFileError, ConfigError, LoraFAConfig, LoraFAError


@pytest.mark.parametrize("kwargs,named", [
    ({"lora_alpha": math.inf}, "lora_alpha=inf"),
    ({"lora_alpha": 0}, "lora_alpha=0"),
    ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern['q_proj']=nan"),
    ({"seed": "x"}, "seed='x'"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '('"),
    ({"target_modules": "("}, "target_modules '('"),
    ({"exclude_modules": "["}, "exclude_modules '['"),
    ({"target_modules": ["q_proj", 3]}, "target_modules=['q_proj', 3]"),
    ({"r": 4.0}, "r=4.0"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
])
def test_config_refuses_values_that_cannot_mean_what_was_asked(kwargs, named):
    with pytest.raises(ConfigError) as e:
        LoraFAConfig(**kwargs)
    assert named in str(e.value) and isinstance(e.value, ValueError)


@pytest.fixture(scope="module")
def gm():
    return lorafa_fx.transform(make_model("llama"), example_inputs=make_batch("llama", 2, 8), config=LoraFAConfig(r=4))


@pytest.mark.parametrize("kwargs,named", [
    ({"lr": math.inf}, "lr=inf"), ({"lr": -1.0}, "lr=-1.0"), ({"weight_decay": math.nan}, "weight_decay=nan"),
    ({"betas": (0.9, 1.0)}, "betas=(0.9, 1.0)"), ({"eps": math.inf}, "eps=inf"),
])
def test_optimizer_refuses_non_finite_hyperparameters(gm, kwargs, named):
    with pytest.raises(ConfigError) as e:
        lorafa_fx.create_lorafa_optimizer(gm, **{"lr": 1e-3, **kwargs})
    assert named in str(e.value)


@pytest.mark.parametrize("damage,named", [
    (lambda d: (d / "adapter_config.json").write_text("[]"), "holds a JSON list"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
     "cannot be read as safetensors"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "holds no adapter"),
])
def test_broken_adapter_files_name_the_file(gm, tmp_path, damage, named):
    lorafa_fx.save_adapter(gm, tmp_path / "a")
    damage(tmp_path / "a")
    with pytest.raises(AdapterFileError) as e:
        lorafa_fx.load_adapter(gm, tmp_path / "a")
    assert named in str(e.value) and str(tmp_path / "a") in str(e.value)


def test_a_saved_adapter_round_trips_after_the_checks(gm, tmp_path):
    """Reference: the saved file itself (the checks refuse nothing valid)."""
    lorafa_fx.save_adapter(gm, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    lorafa_fx.load_adapter(gm, tmp_path / "a")


@pytest.mark.parametrize("model_or_config,kwargs,named", [
    ("llama-2-7b", {"batch_size": 2.0, "seq_len": 8}, "batch_size=2.0"),
    ("llama-2-7b", {"batch_size": 0, "seq_len": 8}, "batch_size=0"),
    ("llama-2-7b", {"batch_size": 1, "seq_len": -1}, "seq_len=-1"),
    ("llama-2-7b", {"batch_size": 1, "seq_len": 5000}, "position limit 4096"),
    ({"model_type": "llama"}, {"batch_size": 1, "seq_len": 8}, "model_or_config=dict"),
    ("no-such-preset", {"batch_size": 1, "seq_len": 8}, "'no-such-preset'"),
    ("llama-2-7b", {"batch_size": 1, "seq_len": 8, "budget": "40Gbit"}, "budget='40Gbit'"),
    ("llama-2-7b", {"batch_size": 1, "seq_len": 8, "plan": lambda: lorafa_fx.PlanConfig(world_size=0)}, "world_size=0"),
    ("llama-2-7b", {"batch_size": 1, "seq_len": 8, "plan": lambda: lorafa_fx.PlanConfig(world_size=2, sharding="zero3")},
     "sharding='zero3'"),
])
def test_estimate_refuses_bad_arguments_before_building_anything(model_or_config, kwargs, named):
    with pytest.raises(LoraFAError) as e:
        lorafa_fx.estimate(model_or_config, **{k: v() if callable(v) else v for k, v in kwargs.items()})
    assert named in str(e.value) and isinstance(e.value, ValueError)


