"""Planning for a card from here (devices.PROFILES): its memory as the automatic budget, the
step's predicted time on it, and ``offload=False`` (``--no-offload``). References: closed forms
(the datasheet figures in the profile, the FLOPs the plan reports), the unplanned step's time,
and for ``--no-offload`` estimate()'s plan and the command's plan without the flag (the plan
itself: test_offload.py)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from lorafa_fx.__main__ import main
from lorafa_fx.choices import OFFLOADED
from lorafa_fx.devices import ACHIEVED_FRACTION, PROFILES
from lorafa_fx.errors import ConfigError


def _tiny() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                       vocab_size=96, max_position_embeddings=128)


@functools.cache
def _plan(budget=None, **plan):
    return lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=64, budget=budget, config=lorafa_fx.LoraFAConfig(r=8),
                              plan=lorafa_fx.PlanConfig(**plan))


def test_step_time_is_the_steps_flops_at_the_cards_throughput_and_recomputation_adds_its_own():
    unplanned = _plan(device="h100")
    card = PROFILES["h100"]
    assert unplanned.step_flops > 0 and unplanned.recompute_flops == 0
    assert unplanned.step_seconds == pytest.approx(unplanned.step_flops / (card.dense_bf16_flops * ACHIEVED_FRACTION))
    planned = _plan(device="H100", budget=int(unplanned.predicted_peak_bytes * 0.9))
    assert planned.recompute_flops > 0 and planned.step_flops == unplanned.step_flops
    assert planned.step_seconds == pytest.approx(unplanned.step_seconds * (1 + planned.extra_compute_pct / 100))
    assert "predicted step time (NVIDIA H100 SXM5)" in str(planned)
    assert planned.to_dict()["step_seconds"] == planned.step_seconds
    # No card named: no time (this machine's CPU is not a profile).
    assert _plan().step_seconds is None


def test_auto_budget_for_a_card_is_an_idle_cards_memory_minus_the_reserve():
    plan = _plan(device="a100", budget="auto")
    # 80 GB A100: reserve 1 GiB + 5% of 80 GB = 1_073_741_824 + 4_000_000_000 bytes.
    assert (plan.budget_bytes, plan.reserve_bytes) == (74_926_258_176, 5_073_741_824)
    assert plan.budget_device == "a100" and plan.device_profile == "a100"


def test_an_unknown_card_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="h800.*a100, h100, h200"):
        _plan(device="h800", budget="auto")


def test_a_local_card_is_known_by_its_name(monkeypatch):
    from lorafa_fx.devices import device_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_profile("cuda:0") == device_profile(torch.device("cuda", 0)) == "h100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert device_profile("cuda") is None and device_profile("cpu") is None


def test_no_offload_on_the_command_line_reaches_the_planner(tmp_path, capsys):
    """Reference: estimate()'s plan with offload=False, and the same command without the flag,
    whose plan offloads (so the flag is what keeps the blocks on the card)."""
    _tiny().save_pretrained(tmp_path)
    unplanned = _plan(device="h100")
    budget = str(int(unplanned.predicted_peak_bytes * 0.8))
    args = ["plan", "--config", str(tmp_path), "--batch", "2", "--seq", "64", "--rank", "8", "--alpha", "8",
            "--budget", budget, "--device", "h100", "--json"]
    assert main([*args, "--no-offload"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["offload"] is False
    assert not {d.value for d in OFFLOADED} & set(printed["recompute_by_block"].values())
    expected = _plan(device="h100", budget=int(budget), offload=False)
    assert printed["recompute_by_block"] == expected.recompute_by_block and expected.recompute_flops > 0
    assert main(args) == 0
    allowed = json.loads(capsys.readouterr().out)
    assert allowed["offload"] is True and {d.value for d in OFFLOADED} & set(allowed["recompute_by_block"].values())


@pytest.mark.parametrize("value", ["no", 0, None])
@pytest.mark.parametrize("entry", ["transform", "estimate", "largest_batch_size"])
def test_a_non_bool_offload_is_refused_naming_the_argument(entry, value):
    call = {
        "transform": lambda: lorafa_fx.transform(LlamaForCausalLM(_tiny()), "1GB", example_inputs={},
                                                 plan=lorafa_fx.PlanConfig(offload=value)),
        "estimate": lambda: _plan(budget="1GB", offload=value),
        "largest_batch_size": lambda: lorafa_fx.largest_batch_size(_tiny(), seq_len=64, budget="1GB",
                                                                   plan=lorafa_fx.PlanConfig(offload=value)),
    }[entry]
    with pytest.raises(ConfigError, match=rf"offload={value!r} must be True or False: pass offload=False"):
        call()
