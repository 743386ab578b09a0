"""memory/cost_model.py (the cost model): predictions against measured steps and closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_KWARGS, make_batch, make_model, transform, transformed

import lorafa_fx
from lorafa_fx import LoraFAConfig
from lorafa_fx.measure import measure_peak_bytes, module_state, saved_activation_bytes
from lorafa_fx.memory.cost_model import CostModel


def _transform(name: str, r: int = 8):
    return transformed(name, (2, 8), r=r)[1]


def _estimate(gm, batch):
    return CostModel(batch)(gm)


def _measured(gm, batch, autocast_dtype=None):
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = gm(**batch).loss
        loss.backward()
        opt.step()

    step()  # the measured step is the second: AdamW's states exist
    peak = measure_peak_bytes(step, gm, opt, batch)
    with torch.autocast("cpu", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        saved = saved_activation_bytes(lambda: gm(**batch).loss, module_state(gm))
    return peak, saved


@pytest.mark.parametrize("name", ["llama", "gpt2", "roberta", "t5"])
@pytest.mark.parametrize("shape", [(2, 16), (4, 24)])
def test_predicted_peak_and_saved_bytes_match_a_measured_step(name, shape):
    """Reference: MemTracker's peak of a real full step (fwd, bwd, AdamW, 2nd iteration) and
    saved_tensors_hooks' bytes; acceptance is 5% and 2%."""
    gm = _transform(name).train()
    batch = make_batch(name, *shape, seed=3)
    estimate = _estimate(gm, batch)
    peak, saved = _measured(gm, batch)
    assert estimate.peak == pytest.approx(peak, rel=0.05)
    assert estimate.saved_activations == pytest.approx(saved, rel=0.02)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_an_autocast_step_is_predicted_within_5pct(name):
    """Reference: MemTracker's peak of a real step whose forward runs under bf16 autocast (as
    Trainer(bf16=True) runs it) and its saved bytes; the plan says which precision it assumed."""
    config = LoraFAConfig(r=8, **CONFIG_KWARGS.get(name, {}))
    gm = transform(make_model(name), example_inputs=make_batch(name, 2, 8), config=config,
                             plan=lorafa_fx.PlanConfig(mixed_precision="bf16"))
    assert gm.lorafa_plan.mixed_precision == "bf16" and "mixed bf16" in str(gm.lorafa_plan)
    batch = make_batch(name, 2, 8)
    peak, saved = _measured(gm.train(), batch, torch.bfloat16)
    assert gm.lorafa_plan.predicted_peak_bytes == pytest.approx(peak, rel=0.05)
    assert gm.lorafa_plan.saved_activation_bytes == pytest.approx(saved, rel=0.02)
    # Without autocast in the simulation the same step is mispredicted: autocast keeps bf16 copies of
    # the weights each linear reads (for the input's gradient) and bf16 activations.
    assert _estimate(gm, batch).peak != pytest.approx(peak, rel=0.05)


def test_mixed_precision_defaults_to_the_autocast_in_force():
    with torch.autocast("cpu", torch.bfloat16):
        gm = transform(make_model("llama"), example_inputs=make_batch("llama", 2, 8))
    assert gm.lorafa_plan.mixed_precision == "bf16"
    assert _transform("llama").lorafa_plan.mixed_precision == "no"


def test_static_terms_are_closed_form():
    """Reference: weights = sum of parameter bytes; AdamW states = 2 fp32 per trainable value."""
    gm = _transform("llama")
    estimate = _estimate(gm, make_batch("llama", 2, 16))
    assert estimate.weights == sum(p.numel() * p.element_size() for p in gm.parameters())
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    assert estimate.optimizer_states == 2 * 4 * trainable + 4 * sum(1 for p in gm.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_activation_term_scales_linearly_in_batch_and_sequence(name):
    """Reference: b*s scaling. With the mask elided, every saved tensor is linear in b and in s."""
    gm = _transform(name).eval()  # no dropout masks: pure b*s terms
    base = _estimate(gm, make_batch(name, 2, 16)).saved_activations
    assert _estimate(gm, make_batch(name, 4, 16)).saved_activations == pytest.approx(2 * base, rel=0.02)
    assert _estimate(gm, make_batch(name, 2, 32)).saved_activations == pytest.approx(2 * base, rel=0.02)


def test_rank_enters_only_through_bsr_and_adapter_sizes():
    """Reference: Table 1. Going from r=4 to r=12 adds b*s*(12-4)*4 bytes per adapter to the
    activations, (in+out)*(12-4)*4 to the weights and 2*out*(12-4)*4 to AdamW's states."""
    b, s = 2, 16
    batch = make_batch("llama", b, s)
    lo, hi = (_estimate(_transform("llama", r).eval(), batch) for r in (4, 12))
    adapters = _transform("llama", 4).lorafa.adapters
    dr = 8
    assert hi.saved_activations - lo.saved_activations == len(adapters) * b * s * dr * 4
    assert hi.weights - lo.weights == sum((a.in_features + a.out_features) * dr * 4 for a in adapters)
    assert hi.optimizer_states - lo.optimizer_states == sum(2 * a.out_features * dr * 4 for a in adapters)


def test_peak_location_and_per_block_breakdown():
    gm = _transform("llama").train()
    estimate = _estimate(gm, make_batch("llama", 2, 16))
    assert estimate.peak_phase in ("forward", "backward", "optimizer")
    assert estimate.peak_node in {n.name for n in gm.graph.nodes} | {"step"}
    assert {"model.layers.0", "model.layers.1"} <= set(estimate.saved_by_module)
    # identical decoder layers save alike (up to tensors at their boundaries, e.g. the residual)
    layer0, layer1 = estimate.saved_by_module["model.layers.0"], estimate.saved_by_module["model.layers.1"]
    assert layer0 == pytest.approx(layer1, rel=0.03)
    # Reference for the breakdown's total: saved_tensors_hooks on a real forward.
    measured = saved_activation_bytes(lambda: gm(**make_batch("llama", 2, 16)).loss, module_state(gm))
    assert sum(estimate.saved_by_module.values()) == pytest.approx(measured, rel=0.02)
