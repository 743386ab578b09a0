"""Bad input gets a library exception naming the input, the value and the fix (never a raw
error from deep inside torch, safetensors or json). Capture-side inputs: test_capture.py;
the command line: test_cli.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import make_batch, make_model, transform

import lorafa_fx
from lorafa_fx import AdapterFileError, ConfigError, LoraFAConfig, LoraFAError
from lorafa_fx.errors import ExampleInputsError
from lorafa_fx.units import parse_budget


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
    # booleans are booleans: "false" and "no" are truthy strings, once read as True
    ({"use_rslora": "false"}, "use_rslora='false'"),
    ({"chunked_cross_entropy": "no"}, "chunked_cross_entropy='no'"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern=['q_proj']"),
    ({"alpha_pattern": {3: 16}}, "alpha_pattern={3: 16}"),
    # PEFT 0.21 reads a string modules_to_save character by character (and wraps whole submodules)
    ({"modules_to_save": "lm_head"}, "modules_to_save=['lm_head']"),
    ({"target_modules": 3}, "target_modules=3"),
    ({"lora_alpha": 1e-20}, "lora_alpha=1e-20"),
    ({"lora_alpha": 1e30}, "lora_alpha=1e+30"),
    ({"r": 4, "alpha_pattern": {"q_proj": 1e-9}}, "lora_alpha=1e-09 with r=4"),
    ({"r": 8, "min_r": 1, "lora_alpha": 8e6}, "lora_alpha=8000000.0 with r=1"),
])
def test_config_refuses_values_that_cannot_mean_what_was_asked(kwargs, named):
    with pytest.raises(ConfigError) as e:
        LoraFAConfig(**kwargs)
    assert named in str(e.value) and isinstance(e.value, ValueError)


@pytest.fixture(scope="module")
def gm():
    return transform(make_model("llama"), example_inputs=make_batch("llama", 2, 8), config=LoraFAConfig(r=4))


@pytest.mark.parametrize("kwargs,named", [
    ({"lr": math.inf}, "lr=inf"), ({"lr": -1.0}, "lr=-1.0"), ({"weight_decay": math.nan}, "weight_decay=nan"),
    ({"betas": (0.9, 1.0)}, "betas=(0.9, 1.0)"), ({"eps": math.inf}, "eps=inf"), ({"betas": 0.9}, "betas=0.9"),
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




@pytest.mark.parametrize("lora_alpha", [4e-6, 4e6])
def test_the_optimizer_trains_at_both_ends_of_the_accepted_scalings(lora_alpha):
    """Reference: finiteness, and B moved off 0. scaling 1e-6 and 1e6 (r=4) are SCALING_RANGE's ends;
    outside it the correction's 1 / scaling**2 made every lora_B NaN after two steps (1e-20) or left it
    at 0 (1e30)."""
    from lorafa_fx.config import SCALING_RANGE

    assert SCALING_RANGE == (1e-6, 1e6)
    batch = make_batch("llama", 2, 8)
    gm = transform(make_model("llama"), example_inputs=batch,
                   config=LoraFAConfig(r=4, lora_alpha=lora_alpha, target_modules=["q_proj", "down_proj"]))
    opt = lorafa_fx.create_lorafa_optimizer(gm, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        gm(**batch).loss.backward()
        opt.step()
    for a in gm.lorafa.adapters:
        b = gm.get_parameter(f"{a.path}.lora_B.weight")
        assert b.isfinite().all() and (b != 0).all(), a.path
    assert math.isfinite(gm(**batch).loss.item())


@pytest.mark.parametrize("kwargs,error,named", [
    ({"dtype": "bf16"}, ConfigError, "dtype='bf16'"),
    ({"dtype": torch.int8}, ConfigError, "dtype=torch.int8"),
    ({"progress": "x"}, ConfigError, "progress='x'"),
    ({"plan": lorafa_fx.PlanConfig(device="h10")}, ConfigError, "device='h10'"),
    ({"plan": lorafa_fx.PlanConfig(device="banana")}, ConfigError, "device='banana'"),
    ({"budget": "²"}, ConfigError, "budget='²'"),
    ({"budget": "1.5.3GB"}, ConfigError, "budget='1.5.3GB'"),
])
def test_estimate_arguments_that_would_fail_deep_inside_are_refused_naming_the_value(kwargs, error, named):
    """Before: AttributeError (torch.bf16), TypeError ('str' object is not callable), "invalid literal for
    int()", or an unknown device silently planned as no card (no timing, no offload)."""
    with pytest.raises(error) as e:
        lorafa_fx.estimate("llama-2-7b", batch_size=1, seq_len=8, **kwargs)
    assert named in str(e.value)


def test_an_unknown_device_names_the_cards_and_torch_devices():
    with pytest.raises(ConfigError) as e:
        lorafa_fx.estimate("llama-2-7b", batch_size=1, seq_len=8, plan=lorafa_fx.PlanConfig(device="h10"))
    assert "a100, h100, h200" in str(e.value) and "torch device string" in str(e.value)


@pytest.mark.parametrize("budget,expected", [
    ("1TB", 10**12), ("2TiB", 2 * 2**40), ("1.5tb", 1_500_000_000_000), ("512B", 512), ("0.5KiB", 512),
])
def test_budgets_take_the_documented_T_units(budget, expected):
    """Reference: the unit's definition (10**12, 2**40); accelerate's parser refused "1TB"."""
    assert parse_budget(budget) == expected


def test_a_budget_under_one_byte_is_refused_with_the_accepted_forms():
    with pytest.raises(ValueError, match=r"budget='0.5B' must be at least one byte.*'40GB'"):
        parse_budget("0.5B")


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.mark.parametrize("change,error,named", [
    (lambda b: {k: v[0] for k, v in b.items()}, ExampleInputsError, "example_inputs['input_ids'] has shape (8,)"),
    (lambda b: {**b, "labels": b["labels"].tolist()}, ExampleInputsError, "example_inputs['labels'] is a list"),
    (lambda b: {k: v.to("meta") for k, v in b.items()}, ExampleInputsError, "'input_ids'] is on the meta device"),
    (lambda b: {k: v[:, :0] for k, v in b.items()}, ExampleInputsError, "shape (2, 0)"),
])
def test_example_inputs_export_would_fail_on_are_refused_first(llama, change, error, named):
    """Before: CaptureError from inside transformers' masking code, or export's pytree mismatch."""
    with pytest.raises(error) as e:
        lorafa_fx.transform(llama, example_inputs=change(make_batch("llama", 2, 8)))
    assert named in str(e.value)


def test_a_model_on_the_meta_device_is_refused_with_where_to_go():
    """Before: RuntimeError "Tensor.item() cannot be called on meta tensors" from the model's code."""
    meta = make_model("llama").to("meta")
    with pytest.raises(ConfigError, match="meta device.*from_pretrained"):
        lorafa_fx.transform(meta, example_inputs=make_batch("llama", 2, 8))
    with pytest.raises(ConfigError, match=r"meta device.*estimate\(model.config"):
        lorafa_fx.estimate(meta, batch_size=1, seq_len=8)


@pytest.mark.parametrize("field,value,named", [
    ("r", "4", '"4"'), ("r", 0, "'r' is 0"), ("lora_alpha", None, "'lora_alpha' is null"),
    ("rank_pattern", ["q_proj"], "'rank_pattern' is [\"q_proj\"]"), ("rank_pattern", {"(": 2}, "'rank_pattern'"),
    ("alpha_pattern", {"q_proj": "x"}, "'alpha_pattern'"), ("use_rslora", "false", "'use_rslora' is \"false\""),
    ("modules_to_save", "lm_head", "'modules_to_save'"), ("peft_type", 3, "'peft_type' is 3"),
])
def test_adapter_config_fields_of_the_wrong_type_name_the_file_field_and_value(gm, tmp_path, field, value, named):
    """Before: TypeError/AttributeError from the scaling arithmetic, or a wrong value read silently."""
    lorafa_fx.save_adapter(gm, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(AdapterFileError) as e:
        lorafa_fx.load_adapter(gm, tmp_path / "a")
    assert str(config_file) in str(e.value) and named in str(e.value) and "save the adapter again" in str(e.value)


def test_deeply_nested_json_is_the_librarys_error(gm, tmp_path):
    """Before: RecursionError from json's decoder."""
    lorafa_fx.save_adapter(gm, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFileError, match="nests JSON deeper"):
        lorafa_fx.load_adapter(gm, tmp_path / "a")


def test_save_adapter_to_an_empty_path_is_refused(gm, tmp_path, monkeypatch):
    """Before: Path("") is the working directory, whose files were hard-linked into the adapter."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="path=''"):
        lorafa_fx.save_adapter(gm, "")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
