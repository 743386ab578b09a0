"""MemoryPlan (gm.lorafa_plan) and estimate(): the plan users print, from a model or a config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_batch, make_model, transform

import lorafa_fx
from lorafa_fx import MemoryPlan


def test_transform_attaches_a_printable_json_plan():
    gm = transform(make_model("llama"), example_inputs=make_batch("llama", 2, 16))
    plan = gm.lorafa_plan
    assert isinstance(plan, MemoryPlan) and plan.budget_bytes is None
    assert [layer.path for layer in plan.layers] == [a.path for a in gm.lorafa.adapters]
    # each adapter keeps exactly its xa, b*s*r fp32 values (Table 1)
    assert {layer.saved_bytes for layer in plan.layers} == {2 * 16 * 8 * 4}
    assert plan.predicted_peak_bytes > plan.weights_bytes + plan.saved_activation_bytes
    text = str(plan)
    assert "predicted peak" in text and "model.layers.1.mlp.down_proj" in text and "recompute" in text
    assert json.loads(json.dumps(plan.to_dict()))["predicted_peak_bytes"] == plan.predicted_peak_bytes


def test_estimate_from_a_config_equals_the_plan_of_the_real_model():
    """Reference: the same architecture with real fp32 weights, planned by transform()."""
    cfg = make_model("llama").config
    plan = lorafa_fx.estimate(cfg, batch_size=2, seq_len=16, dtype=torch.float32)
    real = transform(make_model("llama"), example_inputs=make_batch("llama", 2, 16)).lorafa_plan
    assert plan.predicted_peak_bytes == real.predicted_peak_bytes
    assert plan.saved_activation_bytes == real.saved_activation_bytes
    assert plan.batch_shape["input_ids"] == (2, 16)


def test_estimate_of_a_model_plans_another_batch_shape():
    """Reference: the saved bytes of a step at the target shape (activation term linear in b*s)."""
    model = make_model("llama")
    small = lorafa_fx.estimate(model, batch_size=2, seq_len=16).saved_activation_bytes
    big = lorafa_fx.estimate(make_model("llama"), batch_size=4, seq_len=16).saved_activation_bytes
    assert big == pytest.approx(2 * small, rel=0.02)


@pytest.mark.slow
def test_llama2_7b_plans_without_weights_in_under_2gb():
    """Llama-2-7B's config, bs 16 x 1024, r 64, bf16, planned from fake weights: its weight bytes are
    the closed form, every linear is adapted, and the planning process stays under 2 GB. (How long
    planning takes is measured by `python -m bench plan_time`, not asserted here.)"""
    script = textwrap.dedent("""
        import resource
        import lorafa_fx
        from lorafa_fx.presets import PRESETS
        plan = lorafa_fx.estimate(PRESETS["llama-2-7b"](), batch_size=16, seq_len=1024,
                                  config=lorafa_fx.LoraFAConfig(r=64))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, plan.weights_bytes, len(plan.layers),
              plan.predicted_peak_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rss, weights, n_layers, peak = out.stdout.split()
    assert int(rss) < 2 * 2**30
    # Llama-2-7B's 6,738,415,616 parameters plus r=64 adapters, (in + out) * r per linear, in bf16
    adapters = 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert int(weights) == (6_738_415_616 + adapters) * 2
    assert int(n_layers) == 32 * 7
    assert int(peak) > int(weights)
