"""Activation offload (passes/_offload.py via recompute_regions, planned by memory/planner.py).

References: the same graph without offload (loss and lora_B grads, bit for bit: offload only
moves saved tensors), the whole-graph cost model without offload (saved bytes), and the closed
form of the planner's transfer time. The CUDA streams are not exercised here (no GPU in CI):
on the CPU the same pack/fetch path runs with plain copies.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora_llama, step_grads
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx.choices import OFFLOADED, Decision
from lorafa_fx.devices import ACHIEVED_FRACTION, PROFILES
from lorafa_fx.memory.compose import ComposedSimulator
from lorafa_fx.memory.cost_model import CostModel
from lorafa_fx.memory.simulate import with_decisions
from lorafa_fx.ops import offload as _offload
from lorafa_fx.stages import REALISE


@pytest.fixture
def every_tensor(monkeypatch):
    """Offload every saved tensor of an offloaded block (the test models' are all small)."""
    monkeypatch.setattr(_offload, "MIN_BYTES", 0)


def test_offloaded_blocks_train_bit_for_bit_as_kept_ones_eager_and_compiled(every_tensor):
    gm, batch, blocks = random_lora_llama()
    loss, grads = step_grads(gm, batch)
    offloaded = with_decisions(gm, {b: Decision.OFFLOAD for b in blocks[1:]}, REALISE)
    for module in (offloaded, torch.compile(offloaded, backend="aot_eager")):
        for _ in range(2):  # the second step starts afresh (no tensor of the first is reused)
            got_loss, got = step_grads(module, batch)
            assert torch.equal(got_loss, loss)
            assert all(torch.equal(got[n], g) for n, g in grads.items())


def test_an_offloaded_block_keeps_nothing_on_the_device_at_the_end_of_forward(every_tensor):
    gm, batch, blocks = random_lora_llama()
    kept = CostModel(batch)(gm)
    decisions = {b: Decision.OFFLOAD for b in blocks[1:3]}
    offloaded = CostModel(batch, realise=REALISE)(gm, decisions)
    # What stays of an offloaded block is at most its output, which the next block saves.
    residual = 2 * 32 * 64 * 4
    assert offloaded.saved_activations <= (
        kept.saved_activations - sum(kept.saved_by_module[b] for b in decisions) + len(decisions) * residual
    )
    # The composed simulation agrees with the whole one on offloaded runs too.
    deep, deep_batch, deep_blocks = random_lora_llama(8)
    decisions = {b: Decision.OFFLOAD for b in deep_blocks[:6]}  # a run longer than its sample (`compose._lead`)
    whole, composed = CostModel(deep_batch, realise=REALISE)(deep, decisions), ComposedSimulator(CostModel(deep_batch, realise=REALISE))(deep, decisions)
    assert (composed.peak, composed.saved_by_module) == (whole.peak, whole.saved_by_module)


def _plan(budget=None, **plan):
    # Llama-2-7B's layers (fake weights: nothing allocated), 8 of them: enough compute per
    # saved byte that an H100's host link hides most of an offloaded block's transfers.
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                         vocab_size=1000, max_position_embeddings=1024)
    # The loss whole: the budget is met by the blocks alone.
    lora = lorafa_fx.LoraFAConfig(r=8, chunked_cross_entropy=False)
    return lorafa_fx.estimate(config, batch_size=4, seq_len=1024, budget=budget, config=lora,
                              plan=lorafa_fx.PlanConfig(mixed_precision="bf16", **plan))


def _offloaded(plan) -> list[str]:
    return [b for b, d in plan.recompute_by_block.items() if d in OFFLOADED]


def test_planner_offloads_on_a_card_when_its_transfers_cost_less_than_recomputing_unless_forbidden():
    unplanned = _plan(device="h100")
    # A budget the MLPs' transfers meet: the link's exposed waits (the last copy before the loss,
    # the first fetch of backward) cost less than the recomputation that meets it without a card.
    budget = int(unplanned.predicted_peak_bytes * 0.9)
    plan = _plan(device="h100", budget=budget)
    assert _offloaded(plan) and plan.predicted_peak_bytes <= budget
    # Its cost is its recomputation (offloaded checkpoints) and the time compute waits for the
    # link, added to the unconstrained step's time.
    assert plan.offload_seconds >= 0
    card = PROFILES["h100"]
    rate = card.dense_bf16_flops * ACHIEVED_FRACTION
    expected = unplanned.step_seconds + plan.recompute_flops / rate + plan.offload_seconds
    assert plan.step_seconds == pytest.approx(expected)
    # Without a card (a CPU step) the same budget is met by recomputation only, which on the card
    # would cost more time than the transfers: why the planner chose them.
    cpu = _plan(budget=budget)
    assert cpu.recompute_flops > 0 and not _offloaded(cpu)
    assert plan.step_seconds - unplanned.step_seconds < cpu.recompute_flops / rate
    # offload=False (host or pinned memory short): on the card, what the plan without a card
    # recomputes, timed on the card (the step plus its recomputation: slower than offloading).
    forbidden = _plan(device="h100", budget=budget, offload=False)
    assert forbidden.recompute_flops > 0 and not _offloaded(forbidden) and forbidden.fits
    assert (forbidden.recompute_by_block, forbidden.predicted_peak_bytes) == (cpu.recompute_by_block,
                                                                               cpu.predicted_peak_bytes)
    assert forbidden.offload_seconds == 0 and forbidden.step_seconds > plan.step_seconds
    assert forbidden.step_seconds == pytest.approx(unplanned.step_seconds * (1 + forbidden.extra_compute_pct / 100))
    # The printout and the JSON say offload was forbidden; a plan that could offload says nothing.
    assert (forbidden.offload, plan.offload, forbidden.to_dict()["offload"]) == (False, True, False)
    assert "forbidden (offload=False)" in str(forbidden) and "offload=False" not in str(plan)
