"""Planning for a card from here (devices.PROFILES): its memory as the automatic budget, and the
step's predicted time on it. References: closed forms (the datasheet figures in the profile,
the FLOPs the plan reports) and the unplanned step's time."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx.devices import ACHIEVED_FRACTION, PROFILES, RESERVE
from lorafa_fx.errors import ConfigError


def _tiny() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                       vocab_size=96, max_position_embeddings=128)


def _plan(**kwargs):
    return lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=64, config=lorafa_fx.LoraFAConfig(r=8), **kwargs)


def test_step_time_is_the_steps_flops_at_the_cards_throughput_and_recomputation_adds_its_own():
    unplanned = _plan(device="h100")
    card = PROFILES["h100"]
    assert unplanned.step_flops > 0 and unplanned.recompute_flops == 0
    assert unplanned.step_seconds == pytest.approx(unplanned.step_flops / (card.dense_bf16_flops * ACHIEVED_FRACTION))
    planned = _plan(device="H100", budget=int(unplanned.predicted_peak_bytes * 0.9))
    assert planned.recomputed_blocks and planned.step_flops == unplanned.step_flops
    assert planned.step_seconds == pytest.approx(unplanned.step_seconds * (1 + planned.extra_compute_pct / 100))
    assert "predicted step time (NVIDIA H100 SXM5)" in str(planned)
    assert planned.to_dict()["step_seconds"] == planned.step_seconds
    # No card named: no time (this machine's CPU is not a profile).
    assert _plan().step_seconds is None


def test_auto_budget_for_a_card_is_an_idle_cards_memory_minus_the_reserve():
    plan = _plan(device="a100", budget="auto")
    reserve = RESERVE["cuda"].fixed_bytes + int(RESERVE["cuda"].fraction * PROFILES["a100"].memory_bytes)
    assert (plan.budget_bytes, plan.reserve_bytes) == (PROFILES["a100"].memory_bytes - reserve, reserve)
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
