"""optim: the LoRA-FA optimizer against PEFT's LoraFAOptimizer and torch.optim.AdamW."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import make_batch, peft_lora_B, peft_reference, randomize_lora_B, transformed

from lorafa_fx.optim import LoraFAOptimizer, create_lorafa_optimizer

LR = 1e-2
STEPS = 20
TOL = 1e-5
#: q at r=8 (scaling 2), v at r=4 (scaling 4): two (out, r) groups, two scalings.
LLAMA_CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4}}


@pytest.fixture
def peft_fp32(monkeypatch):
    """PEFT runs its correction under bf16 autocast when accelerate says bf16 is available, which
    it always says on CPU (accelerate.utils.imports.is_bf16_available); compare in fp32."""
    import peft.optimizers.lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda *a, **k: False)
    return peft_lorafa.create_lorafa_optimizer


def _transformed(name: str = "llama", **config):
    model, gm = transformed(name, (2, 12), **config)
    randomize_lora_B(gm)
    gm.eval()  # no dropout: both sides must see the same function
    return model, gm


@pytest.fixture(scope="module")
def untrained():
    """One transformed tiny Llama shared by the tests that never step an optimizer."""
    return _transformed(**LLAMA_CONFIG)


def _peft(model, gm):
    ref = peft_reference(model, gm)
    ref.eval()
    return ref


def _train(module, opt, name: str = "llama", steps: int = STEPS, first: int = 0, on_step=None) -> None:
    for i in range(first, first + steps):
        if on_step is not None:
            on_step(opt, i + 1)
        opt.zero_grad()
        module(**make_batch(name, 2, 12, seed=100 + i)).loss.backward()
        opt.step()


def _lora_B(gm) -> dict[str, torch.Tensor]:
    return {a.path: gm.get_parameter(f"{a.path}.lora_B.weight").detach().clone() for a in gm.lorafa.adapters}


def _trainable(gm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


def _restore(gm, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in snapshot.items():
            gm.get_parameter(n).copy_(t)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_peft_lorafa_optimizer_mixed_ranks(peft_fp32, weight_decay):
    """Reference: peft.optimizers.create_lorafa_optimizer (LoraFAOptimizer, bf16 autocast off) on
    PEFT LoRA with the same A and B; tiny Llama, q (r=8) and v (r=4), 20 identical batches."""
    model, gm = _transformed(**LLAMA_CONFIG)
    ref = _peft(model, gm)
    init = _lora_B(gm)

    _train(gm, create_lorafa_optimizer(gm, lr=LR, weight_decay=weight_decay))
    _train(ref, peft_fp32(ref, r=8, lora_alpha=16, lr=LR, weight_decay=weight_decay))
    ours = _lora_B(gm)
    for path, b in ours.items():
        torch.testing.assert_close(b, peft_lora_B(ref, path).detach(), atol=TOL, rtol=0)

    # The comparison has power: B moved far beyond TOL, and dropping the correction shows.
    assert _max_diff(ours, init) > 100 * TOL
    _restore(gm, {f"{p}.lora_B.weight": t for p, t in init.items()})
    _train(gm, create_lorafa_optimizer(gm, lr=LR, weight_decay=weight_decay, gradient_correction=False))
    assert _max_diff(_lora_B(gm), ours) > 100 * TOL


def test_modules_to_save_match_peft_adamw(peft_fp32):
    """Reference: PEFT's LoraFAOptimizer on RoBERTa with modules_to_save=["classifier"]: its
    adamw-hf fallback for the saved head and the corrected update for every lora_B."""
    model, gm = _transformed("roberta", r=4, lora_alpha=8)
    ref = _peft(model, gm)
    ours_opt = create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1)
    assert len(ours_opt.param_groups) == 2
    head = dict(gm.get_submodule("classifier").named_parameters())
    assert {id(p) for p in ours_opt.param_groups[1]["params"]} == {id(p) for p in head.values()}

    _train(gm, ours_opt, "roberta", steps=10)
    _train(ref, peft_fp32(ref, r=4, lora_alpha=8, lr=LR, weight_decay=0.1), "roberta", steps=10)
    theirs = dict(ref.base_model.model.get_submodule("classifier").modules_to_save["default"].named_parameters())
    for k, p in head.items():
        torch.testing.assert_close(p, theirs[k], atol=TOL, rtol=0)
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight"), peft_lora_B(ref, a.path), atol=TOL, rtol=0)


def test_without_correction_is_torch_adamw():
    """Reference: torch.optim.AdamW (single-tensor path) with PEFT's adamw-hf conventions mapped
    exactly onto it: lr*(1-lr*wd), wd/(1-lr*wd), eps/sqrt(1-beta2**t) at step t."""
    lr, wd, eps, betas = LR, 0.1, 1e-6, (0.9, 0.999)
    _, gm = _transformed(**LLAMA_CONFIG)
    init = _trainable(gm)
    _train(gm, create_lorafa_optimizer(gm, lr=lr, weight_decay=wd, betas=betas, eps=eps, gradient_correction=False))
    ours = _trainable(gm)

    def adamw_hf_as_torch(opt, t):
        for g in opt.param_groups:
            g.update(lr=lr * (1 - lr * wd), weight_decay=wd / (1 - lr * wd), eps=eps / math.sqrt(1 - betas[1] ** t))

    _restore(gm, init)
    params = [p for p in gm.parameters() if p.requires_grad]
    _train(gm, torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False),
           on_step=adamw_hf_as_torch)
    theirs = _trainable(gm)
    assert _max_diff(ours, init) > 1e3 * 1e-6
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)


def test_state_dict_round_trip_equals_uninterrupted():
    """Reference: 10 uninterrupted steps of the same optimizer; here 5 steps, state_dict through
    torch.save/torch.load(weights_only=True) into a fresh optimizer, then 5 more (RoBERTa: both
    param groups)."""
    _, gm = _transformed("roberta", r=4, lora_alpha=8)
    init = _trainable(gm)
    _train(gm, create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1), "roberta", steps=10)
    uninterrupted = _trainable(gm)

    _restore(gm, init)
    first = create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1)
    _train(gm, first, "roberta", steps=5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    halfway = _trainable(gm)
    second = create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1)
    second.load_state_dict(torch.load(buf, weights_only=True))
    _train(gm, second, "roberta", steps=5, first=5)
    resumed = _trainable(gm)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-7, rtol=0)

    # Without the loaded moments the same 5 steps land elsewhere.
    _restore(gm, halfway)
    _train(gm, create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1), "roberta", steps=5, first=5)
    assert _max_diff(_trainable(gm), uninterrupted) > 100 * 1e-7


def test_load_state_dict_rejects_other_adapters(untrained):
    """A state saved for other adapters must not be loaded silently onto these."""
    _, gm = untrained
    opt = create_lorafa_optimizer(gm, lr=LR)
    saved = opt.state_dict()
    saved["param_groups"][0]["adapter_paths"] = saved["param_groups"][0]["adapter_paths"][::-1]
    with pytest.raises(ValueError, match="different adapters"):
        opt.load_state_dict(saved)


def test_lambda_lr_schedule_matches_peft(peft_fp32):
    """Reference: PEFT's LoraFAOptimizer driven by the same torch LambdaLR (lr read per step,
    weight decay scaled by the scheduled lr)."""
    model, gm = _transformed(**LLAMA_CONFIG)
    ref = _peft(model, gm)
    ours = create_lorafa_optimizer(gm, lr=LR, weight_decay=0.1)
    theirs = peft_fp32(ref, r=8, lora_alpha=16, lr=LR, weight_decay=0.1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ours, theirs)]
    for i in range(10):
        for module, opt, sched in ((gm, ours, schedules[0]), (ref, theirs, schedules[1])):
            opt.zero_grad()
            module(**make_batch("llama", 2, 12, seed=100 + i)).loss.backward()
            opt.step()
            sched.step()
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([LR / (i + 2)])
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight"), peft_lora_B(ref, a.path), atol=TOL, rtol=0)


def test_inverse_computed_once_and_refreshed_when_A_changes(peft_fp32, monkeypatch):
    """Reference: PEFT's LoraFAOptimizer, which recomputes pinv(A A^T) every step; after both
    sides' A are overwritten mid-training, ours must follow (no stale cache)."""
    model, gm = _transformed(**LLAMA_CONFIG)
    ref = _peft(model, gm)
    ours = create_lorafa_optimizer(gm, lr=LR)
    theirs = peft_fp32(ref, r=8, lora_alpha=16, lr=LR)
    _train(ref, theirs, steps=3)
    _train(gm, ours, steps=1)

    calls = []
    pinv = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda *a, **k: calls.append(1) or pinv(*a, **k))
    _train(gm, ours, steps=2, first=1)
    assert calls == []

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            new = torch.randn(a.r, a.in_features, generator=g) * 0.2
            gm.get_parameter(f"{a.path}.lora_A.weight").copy_(new)
            ref.base_model.model.get_submodule(a.path).lora_A["default"].weight.copy_(new)
    _train(gm, ours, steps=3, first=3)
    assert len(calls) == len(gm.lorafa.adapters)
    _train(ref, theirs, steps=3, first=3)
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight"), peft_lora_B(ref, a.path), atol=TOL, rtol=0)


def test_is_a_torch_optimizer_with_lora_B_first(untrained):
    """Group 0 is every lora_B in gm.lorafa.adapters order; no lora_A is optimized."""
    _, gm = untrained
    opt = create_lorafa_optimizer(gm, lr=LR)
    assert isinstance(opt, LoraFAOptimizer) and isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["adapter_paths"] == [a.path for a in gm.lorafa.adapters]
    assert [id(p) for p in group["params"]] == [id(gm.get_parameter(f"{a.path}.lora_B.weight")) for a in gm.lorafa.adapters]


def test_errors_say_how_to_fix(untrained):
    """Clear ValueErrors: an untransformed model, a trainable A, a negative lr."""
    model, gm = untrained
    with pytest.raises(ValueError, match="lorafa_fx.transform"):
        create_lorafa_optimizer(model, lr=LR)
    with pytest.raises(ValueError, match="lr=-1"):
        create_lorafa_optimizer(gm, lr=-1.0)
    lora_A = gm.get_parameter(f"{gm.lorafa.adapters[0].path}.lora_A.weight")
    lora_A.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match=r"requires_grad_\(False\)"):
            create_lorafa_optimizer(gm, lr=LR)
    finally:
        lora_A.requires_grad_(False)
