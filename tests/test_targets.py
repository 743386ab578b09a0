"""targets: the adapted set, ranks and scalings equal PEFT's for the same LoraConfig fields."""

from __future__ import annotations

import warnings

import pytest
from conftest import make_model

from lorafa_fx import LoraFAConfig, TargetNotFoundError
from lorafa_fx.targets import select_adapters

CASES = [
    ("llama", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("t5", {"target_modules": "all-linear"}),
    ("roberta", {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": r"model\.layers\.1\.(self_attn|mlp)\.(q|up)_proj"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": r".*layers\.0\..*"}),
    ("t5", {"target_modules": ["q", "v", "wo"], "rank_pattern": {"decoder.block.1.layer.0.SelfAttention.q": 2},
            "alpha_pattern": {"wo": 3.0}}),
    ("llama", {"target_modules": "all-linear", "use_rslora": True, "lora_alpha": 16}),
]


def _peft_adapters(model, fields):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(model, LoraConfig(r=8, **{"lora_alpha": 8, **fields}))
    return {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in ref.named_modules() if isinstance(m, LoraLayer)
    }


@pytest.mark.parametrize("name,fields", CASES)
def test_adapted_set_ranks_and_scalings_match_peft(name, fields):
    """Reference: the LoraLayer modules get_peft_model creates, with their r and scaling."""
    ours = {a.path: (a.r, a.scaling) for a in select_adapters(make_model(name), LoraFAConfig(r=8, **fields))}
    assert ours == _peft_adapters(make_model(name), fields)


def test_unknown_target_lists_the_linear_modules():
    with pytest.raises(TargetNotFoundError) as e:
        select_adapters(make_model("llama"), LoraFAConfig(target_modules=["query", "value"]))
    msg = str(e.value)
    assert "matched no linear module of LlamaForCausalLM" in msg
    assert "model.layers.<i>.self_attn.q_proj  (x2)" in msg
    assert "lm_head" in msg


def test_unknown_modules_to_save_names_candidates():
    with pytest.raises(TargetNotFoundError, match="'classifer' matches no module.*classifier"):
        from lorafa_fx.targets import select_modules_to_save

        select_modules_to_save(make_model("roberta"), LoraFAConfig(modules_to_save=["classifer"]))


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "r=0 must be a positive int"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
    ({"target_modules": []}, "target_modules is empty"),
])
def test_config_rejects_bad_values_with_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraFAConfig(**bad)
