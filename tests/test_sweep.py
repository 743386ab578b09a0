"""Many shapes from one capture (`estimate` with lists, `largest_batch_size`) and ``budget="auto"``
(`lorafa_fx/devices.py`). References: single-shape `estimate` plans of the same config, and
free-memory readings mocked to known values (so no GPU is needed)."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import make_batch, make_model
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx import ConfigError, InfeasibleBudgetError
from lorafa_fx.devices import auto_budget

FP32 = {"dtype": torch.float32}
#: fp32 at seq 16, batches 1-3 fit in 800 kB (3 only with both blocks recomputed), 4 does not.
BUDGET = 800_000


def _tiny() -> LlamaConfig:
    """A Llama config small enough to plan in seconds (hidden 64, 2 layers, 128 positions)."""
    return LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=96, max_position_embeddings=128)


def test_a_sweep_captures_once_and_a_shape_that_does_not_fit_is_a_row():
    """Reference: estimate() at the shape alone: a shape the budget cannot take is the plan at its
    smallest feasible budget (InfeasibleBudgetError.min_budget_bytes), marked as not fitting.
    Rows equal to single-shape plans: test_cli.py."""
    stages: list[str] = []
    rows = lorafa_fx.estimate(_tiny(), batch_size=[3, 6], seq_len=16, budget=BUDGET, progress=stages.append, **FP32)
    assert sum("capturing" in s for s in stages) == 1
    assert [s for s in stages if s.startswith("batch 6 x seq 16 (2 of 2): ")]
    assert [r.batch_shape["input_ids"] for r in rows] == [(3, 16), (6, 16)]

    assert rows[0].fits and rows[0].predicted_peak_bytes <= BUDGET and rows[0].recompute_flops > 0
    with pytest.raises(InfeasibleBudgetError) as e:
        lorafa_fx.estimate(_tiny(), batch_size=6, seq_len=16, budget=BUDGET, **FP32)
    assert rows[1].fits is False and rows[1].budget_bytes == BUDGET
    assert rows[1].predicted_peak_bytes == e.value.min_budget_bytes
    assert rows[1].to_dict()["fits"] is False and "fits the budget" in str(rows[1])


def test_largest_batch_size_fits_and_one_more_does_not():
    """Reference: estimate() with the same budget at the answer and at the answer + 1."""
    batch, plan = lorafa_fx.largest_batch_size(_tiny(), seq_len=16, budget=BUDGET, **FP32)
    assert plan.batch_shape["input_ids"] == (batch, 16) and plan.predicted_peak_bytes <= BUDGET
    alone = lorafa_fx.estimate(_tiny(), batch_size=batch, seq_len=16, budget=BUDGET, **FP32)
    # The search captured at batch 1: FLOPs too are priced at the batch planned.
    assert alone == plan
    with pytest.raises(InfeasibleBudgetError):
        lorafa_fx.estimate(_tiny(), batch_size=batch + 1, seq_len=16, budget=BUDGET, **FP32)


def test_largest_batch_size_when_not_even_one_fits_says_so():
    with pytest.raises(InfeasibleBudgetError) as e:
        lorafa_fx.largest_batch_size(_tiny(), seq_len=16, budget="300kB", **FP32)
    assert "batch_size=1 at seq_len=16" in str(e.value) and f"Pass budget >= {e.value.min_budget_bytes}" in str(e.value)


@pytest.mark.parametrize("kwargs,named", [
    ({"seq_len": 16, "budget": None}, "needs a budget"),
    ({"seq_len": [8, 16], "budget": "1MB"}, "seq_len=[8, 16]"),
])
def test_largest_batch_size_refuses_bad_arguments(kwargs, named):
    with pytest.raises(ConfigError) as e:
        lorafa_fx.largest_batch_size(_tiny(), **kwargs)
    assert named in str(e.value)


@pytest.mark.parametrize("batch_size,named", [([], "batch_size=[]"), ([2, 0], "batch_size=[2, 0]"), ("4", "'4'")])
def test_a_bad_sweep_is_refused_before_capture(batch_size, named):
    with pytest.raises(ConfigError) as e:
        lorafa_fx.estimate(_tiny(), batch_size=batch_size, seq_len=16)
    assert named in str(e.value) and "list of them" in str(e.value)


def _ram(monkeypatch, available: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))


def test_budget_auto_on_cpu_is_the_available_ram_minus_the_reserve(monkeypatch):
    _ram(monkeypatch, 5 * 10**9)
    plan = lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=16, budget="auto", plan=lorafa_fx.PlanConfig(device="cpu"), **FP32)
    # The CPU reserve: 1 GiB, no fraction (devices.RESERVE's documented sizes).
    reserve = 1_073_741_824
    assert (plan.reserve_bytes, plan.budget_bytes) == (reserve, 3_926_258_176)
    assert plan.budget_device == "cpu" and plan.fits
    assert "auto: cpu's free memory minus the reserve" in str(plan) and plan.to_dict()["reserve_bytes"] == reserve


def test_budget_auto_counts_the_weights_a_model_already_holds(monkeypatch):
    """Reference: the model's parameter and buffer bytes (the reading of free RAM excludes them,
    the plan counts them)."""
    _ram(monkeypatch, 4 * 10**9)
    model = make_model("llama")
    resident = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    gm = lorafa_fx.transform(model, "auto", example_inputs=make_batch("llama", 2, 8))
    assert gm.lorafa_plan.budget_bytes == 4 * 10**9 + resident - gm.lorafa_plan.reserve_bytes


def test_budget_auto_refuses_a_device_with_less_free_than_the_reserve(monkeypatch):
    _ram(monkeypatch, 10**6)
    with pytest.raises(ConfigError) as e:
        lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=16, budget="auto", plan=lorafa_fx.PlanConfig(device="cpu"))
    assert "budget='auto'" in str(e.value) and "1.00 MB free" in str(e.value) and "budget='40GB'" in str(e.value)


def _cuda(monkeypatch, count: int, free: int, reserved: int, allocated: int) -> None:
    for name, value in (("is_available", lambda: True), ("device_count", lambda: count),
                        ("current_device", lambda: 0), ("mem_get_info", lambda device: (free, 141 * 10**9)),
                        ("memory_reserved", lambda device: reserved), ("memory_allocated", lambda device: allocated)):
        monkeypatch.setattr(torch.cuda, name, value)


def test_budget_auto_on_cuda_reads_the_driver_and_the_allocators_cache(monkeypatch):
    """Reference: free = the driver's free memory + what the caching allocator holds unused."""
    _cuda(monkeypatch, count=2, free=70 * 10**9, reserved=6 * 10**9, allocated=2 * 10**9)
    plan = lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=16, budget="auto", plan=lorafa_fx.PlanConfig(device="cuda:1"), **FP32)
    # free: 70 GB the driver reports + 4 GB cached unused = 74 GB; the CUDA reserve is
    # 1 GiB + 5% of it = 1_073_741_824 + 3_700_000_000 bytes (devices.RESERVE's documented sizes).
    free, reserve = 74 * 10**9, 4_773_741_824
    assert (plan.budget_bytes, plan.reserve_bytes, plan.budget_device) == (69_226_258_176, reserve, "cuda:1")
    assert auto_budget(torch.device("cuda", 1)) == (69_226_258_176, free, reserve)


def test_a_config_plans_for_the_current_cuda_device_by_default(monkeypatch):
    _cuda(monkeypatch, count=1, free=70 * 10**9, reserved=0, allocated=0)
    plan = lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=16, budget="auto", **FP32)
    assert plan.budget_device == "cuda:0"


@pytest.mark.parametrize("cuda,device,named", [
    (False, "cuda:0", "CUDA is not available"),
    (True, "cuda:3", "1 CUDA device(s)"),
    (True, "mps", "cuda and cpu devices only"),
])
def test_budget_auto_on_a_device_it_cannot_read_says_what_to_pass(monkeypatch, cuda, device, named):
    if cuda:
        _cuda(monkeypatch, count=1, free=70 * 10**9, reserved=0, allocated=0)
    with pytest.raises(ConfigError) as e:
        lorafa_fx.estimate(_tiny(), batch_size=2, seq_len=16, budget="auto", plan=lorafa_fx.PlanConfig(device=device))
    assert f"device={device!r}" in str(e.value) and named in str(e.value) and "budget=" in str(e.value)
