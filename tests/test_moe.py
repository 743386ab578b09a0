"""Mixture-of-experts adapters on tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (`lorafa_fx.zoo`):
targets.py's expert and router adapters, passes/lean_experts.py, the experts' branch of
passes/rewrite_lora_fa.py and ops/experts.py.

References: PEFT 0.21 LoRA with lora_A frozen on the same targets (``target_parameters``:
``ParamWrapper``), with this module's lora_A and lora_B copied in; PEFT's own ``"all-linear"``
set; a per-expert Python loop (the op); the eager module under ``torch.compile``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import pytest
import torch
from conftest import compiled_step, make_batch, make_model, randomize_lora_B, transformed
from torch.testing import FileCheck
from torch.utils.checkpoint import CheckpointPolicy

from lorafa_fx import LoraFAConfig, create_lorafa_optimizer, load_adapter, merge, save_adapter
from lorafa_fx.errors import ConfigError
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.ops.experts import expert_linear, expert_xa, grouped_mm, grouped_mm_t
from lorafa_fx.peft_files import _peft_config
from lorafa_fx.targets import select_adapters
from lorafa_fx.zoo import MOE_ARCHITECTURES

SHAPE = (2, 8)
#: scaling 2 (a power of two), so PEFT's order of scaling rounds alike.
R, ALPHA = 4, 8
#: Issue #26: saved activations at most this fraction of PEFT LoRA's with A frozen.
TARGET = 0.7
#: The model types PEFT 0.21's transformers-v4 conversion knows (it adapts their experts and router under "all-linear").
PEFT_CONVERTS = ("mixtral", "qwen3_moe", "olmoe")
#: Relative error (Frobenius) of a lora_B gradient under bf16 autocast (see the bf16 test).
BF16_RTOL = {"mixtral": 1e-2, "qwen2_moe": 1e-2, "qwen3_moe": 3e-2, "olmoe": 3e-2}
EXPLICIT = {"target_modules": ["q_proj", "v_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]}


@functools.cache
def _pair(name: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """(model, gm) with ``LoraFAConfig(r=4, lora_alpha=8)`` (all-linear) and a random lora_B."""
    model, gm = transformed(name, SHAPE, r=R, lora_alpha=ALPHA)
    randomize_lora_B(gm)
    return model, gm


def _peft(model: torch.nn.Module, gm: torch.fx.GraphModule, **config):
    """PEFT LoRA on a copy of `model` with the LoraConfig `save_adapter` writes for `gm` (its exact
    targets: target_modules and target_parameters), lora_A/lora_B copied from `gm`, lora_A frozen."""
    from peft import LoraConfig, get_peft_model

    fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type", "task_type", "inference_mode"}
    saved = {k: v for k, v in _peft_config(gm, None).items() if k in fields}
    with warnings.catch_warnings(action="ignore"):
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(**{**saved, **config}))
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_B.weight"))
            layer.lora_A["default"].weight.requires_grad_(False)
    return ref


def _lora_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``lora_A``/``lora_B`` weights by PEFT's saved key (``base_model.model.`` and the adapter name dropped)."""
    return {n.removeprefix("base_model.model.").replace(".default.", "."): tuple(p.shape)
            for n, p in module.named_parameters() if ".lora_" in n}


def _grads(gm, ref) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [(a.path, gm.get_parameter(f"{a.path}.lora_B.weight").grad,
             ref.base_model.model.get_submodule(a.path).lora_B["default"].weight.grad) for a in gm.lorafa.adapters]


@pytest.mark.parametrize("name", PEFT_CONVERTS)
def test_all_linear_adapts_what_peft_all_linear_adapts(name):
    """Reference: PEFT's own ``LoraConfig(target_modules="all-linear")``: the same adapters (keys), the
    same shapes (gate_up_proj at rank 2r, the expert count folded in) and the same scalings."""
    model, gm = _pair(name)
    with warnings.catch_warnings(action="ignore"):
        from peft import LoraConfig, get_peft_model

        ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    assert _lora_shapes(gm) == _lora_shapes(ref)
    experts = [a for a in gm.lorafa.adapters if a.num_experts > 1]
    assert {a.parameter for a in experts} == {"gate_up_proj", "down_proj"}
    assert all(a.scaling == ref.base_model.model.get_submodule(a.path).scaling["default"] for a in gm.lorafa.adapters)


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_target_parameters_mean_what_they_mean_in_peft(name):
    """Reference: PEFT with the same ``target_modules`` and ``target_parameters`` (every parameter at r)."""
    model = make_model(name)
    adapters = select_adapters(model, LoraFAConfig(r=R, lora_alpha=ALPHA, **EXPLICIT))
    ours = {}
    for a in adapters:
        ours[f"{a.path}.lora_A.weight"] = (a.folded_r, a.in_features)
        ours[f"{a.path}.lora_B.weight"] = (a.out_features, a.folded_r)
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(action="ignore"):
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, **EXPLICIT))
    assert ours == _lora_shapes(ref)
    assert {a.r for a in adapters} == {R}


def test_bad_expert_configs_say_how_to_fix():
    """Reference: PEFT's own refusals (target_parameters is a list; ParamWrapper refuses dropout)."""
    with pytest.raises(ConfigError, match="list of parameter names"):
        LoraFAConfig(target_parameters="mlp.experts.gate_up_proj")
    with pytest.raises(ConfigError, match="lora_dropout=0.0, or exclude the experts"):
        select_adapters(make_model("mixtral"), LoraFAConfig(lora_dropout=0.1))
    assert select_adapters(make_model("mixtral"), LoraFAConfig(lora_dropout=0.1, exclude_modules=["experts", "gate"]))


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_every_expert_projection_runs_as_expert_linear(name):
    """Structure: transformers' grouped matmul is gone; each layer's two expert projections call
    `expert_linear` with their adapter's ``xa = expert_xa(x, offs, lora_A, scaling)`` and lora_B,
    and ``xa`` is pinned for the partitioner as a linear's is."""
    _, gm = _pair(name)
    FileCheck().check_not("grouped_mm_fallback").check_not("_grouped_mm").run(gm.code)
    calls = [n for n in gm.graph.nodes if n.target is expert_linear]
    assert len(calls) == 2 * 2
    for call in calls:
        x, _, offs, xa, lora_B = call.args
        assert xa.target is expert_xa and xa.args[:2] == (x, offs) and xa.args[3] == ALPHA / R
        assert xa.args[2].target == lora_B.target.replace("lora_B", "lora_A")
        assert xa.meta["recompute"] == CheckpointPolicy.MUST_SAVE


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_loss_and_lora_B_grads_equal_peft_A_frozen_fp32(name):
    """Reference: PEFT LoRA with A frozen, same A and (random) B: loss and every lora_B gradient."""
    model, gm = _pair(name)
    ref = _peft(model, gm)
    batch = make_batch(name, *SHAPE, seed=3)
    gm.zero_grad(set_to_none=True)
    ours, theirs = gm(**batch).loss, ref(**batch).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for path, grad, expected in _grads(gm, ref):
        assert expected.abs().max() > 0, path
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5, msg=path)


def _top1(name: str) -> torch.nn.Module:
    """`name` routing each token to one expert with weight ``v / v = 1``: a routing weight bf16
    represents exactly (see the bf16 test)."""
    config = copy.deepcopy(make_model(name).config)
    config.num_experts_per_tok, config.norm_topk_prob = 1, True
    torch.manual_seed(0)
    return type(make_model(name))(config)


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_bf16_autocast_matches_peft_A_frozen(name):
    """Reference: PEFT LoRA with A frozen under the same ``torch.autocast("cpu", torch.bfloat16)``:
    loss and every lora_B gradient (Frobenius, 1e-2 relative). Experts run in their weights'
    float32 on both sides (transformers' grouped matmul, which autocast does not retype). The
    routers' B are zero, so the routing (a top-k of bf16 logits) is the same on both sides, and
    each token goes to one expert with weight 1: Qwen2/3-MoE and OLMoE round their top-k weights
    to the router logits' dtype (``.to(router_logits.dtype)``, bf16 under autocast), which the
    captured graph, where that dtype was float32, does not follow (`follow_param_dtype`). For the
    same reason Qwen3-MoE's and OLMoE's q/k norms cast back to float32 where the eager model casts
    to its bf16 projection's dtype, a difference of the dense models too: there 3e-2."""
    model, gm = transformed(name, SHAPE, model_fn=_top1, r=R, lora_alpha=ALPHA)
    randomize_lora_B(gm)
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            if a.parameter == "weight":
                gm.get_parameter(f"{a.path}.lora_B.weight").zero_()
    ref = _peft(model, gm)
    batch = make_batch(name, *SHAPE, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = gm(**batch).loss, ref(**batch).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=BF16_RTOL[name] / 100, atol=0)
    for path, grad, expected in _grads(gm, ref):
        if path.endswith(".gate"):  # a weight v / v = 1 passes no gradient to the router
            assert grad.abs().max() <= 1e-6 and expected.abs().max() <= 1e-6, path
        else:
            assert (grad - expected).norm() <= BF16_RTOL[name] * expected.norm(), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_saved_bytes_at_most_0_7_of_peft_A_frozen(name, dtype):
    """Reference: PEFT LoRA with A frozen on the same targets, measured with saved-tensor hooks
    (`measure.saved_activation_bytes`), in fp32 and under bf16 autocast. PEFT keeps each expert
    projection's routed input and its materialised ``W + s·BA``; lorafa_fx keeps ``x·A_e``."""
    model, gm = _pair(name)
    ref = _peft(model, gm)
    batch = make_batch(name, *SHAPE, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = saved_activation_bytes(lambda: gm(**batch).loss, exclude=module_state(gm))
        theirs = saved_activation_bytes(lambda: ref(**batch).loss, exclude=module_state(ref))
    assert ours <= TARGET * theirs, (ours, theirs, ours / theirs)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe",
                                  pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                  pytest.param("olmoe", marks=pytest.mark.slow)])
def test_compiled_equals_eager(name):
    """Reference: the eager module: ``torch.compile(gm, backend="aot_eager", fullgraph=True)`` gives
    the same loss and lora_B gradients, and keeps no more for backward."""
    _, gm = _pair(name)
    gm = copy.deepcopy(gm)
    batch = make_batch(name, *SHAPE, seed=3)
    measure = functools.partial(saved_activation_bytes, exclude=module_state(gm))
    eager = {}
    eager_saved = measure(lambda: eager.setdefault("loss", gm(**batch).loss))
    eager["loss"].backward()
    expected = {a.path: gm.get_parameter(f"{a.path}.lora_B.weight").grad for a in gm.lorafa.adapters}
    saved, loss = compiled_step(gm, batch, measure)
    torch.testing.assert_close(loss, eager["loss"], rtol=1e-6, atol=0)
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight").grad, expected[a.path],
                                   rtol=1e-5, atol=1e-6, msg=a.path)
    assert saved <= eager_saved, (saved, eager_saved)


def _groups(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


@pytest.mark.parametrize("dims", [(16, 24), (6, 5)], ids=["kernel", "fallback"])
def test_expert_linear_equals_a_loop_over_experts_of_W_plus_sBA(dims):
    """Reference: a Python loop over experts of ``x_e (W_e + s·B_e A_e)^T`` (PEFT's ParamWrapper
    delta, its layout of lora_A (E·r, in) and lora_B (out, E·r)), with an expert that gets no row;
    16-byte aligned sizes run torch's grouped-matmul kernel, others transformers' fallback loop.
    Forward, x's gradient and B's; only ``x·A_e`` is kept (and offs)."""
    experts, rows, r, scaling = 4, 12, 4, 2.0
    d_in, d_out = dims
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 9, 12], dtype=torch.int32)  # expert 1 gets no row
    w = torch.randn(experts, d_out, d_in, generator=g)
    lora_A = torch.randn(experts * r, d_in, generator=g)
    lora_B = torch.randn(d_out, r * experts, generator=g).requires_grad_()
    x = torch.randn(rows, d_in, generator=g).requires_grad_()
    out = {}

    def step():
        out["y"] = expert_linear(x, w.transpose(-2, -1), offs, expert_xa(x, offs, lora_A, scaling), lora_B)

    assert saved_activation_bytes(step, exclude=[w, lora_A, lora_B]) == rows * r * 4 + offs.nbytes
    A_e = lora_A.view(experts, r, d_in)
    B_e = lora_B.view(d_out, r, experts).permute(2, 0, 1)
    merged = w + scaling * B_e @ A_e
    expected = torch.cat([x[s:e] @ merged[i].T for i, (s, e) in enumerate(_groups(offs))])
    grad = torch.randn(expected.shape, generator=g)
    torch.testing.assert_close(out["y"], expected, rtol=1e-5, atol=1e-5)
    ours = torch.autograd.grad(out["y"], (x, lora_B), grad)
    theirs = torch.autograd.grad(expected, (x, lora_B), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours[1].view(d_out, r, experts)[:, :, 1].abs().max() == 0


def test_grouped_mm_kernel_and_fallback_agree():
    """Reference: transformers' fallback semantics (one mm per expert), against torch's grouped-matmul
    kernel on the same 16-byte aligned operands (a misaligned view forces the loop)."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([2, 2, 7, 10], dtype=torch.int32)
    x, w, grad = torch.randn(10, 8, generator=g), torch.randn(4, 8, 12, generator=g), torch.randn(10, 12, generator=g)
    loop = torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(_groups(offs))])
    padded = torch.randn(4, 8, 13, generator=g)
    padded[..., :12] = w
    torch.testing.assert_close(grouped_mm(x, w, offs), loop)
    torch.testing.assert_close(grouped_mm(x, padded[..., :12], offs), loop)  # row stride 13: not aligned
    per_expert = torch.stack([x[s:e].T @ grad[s:e] for s, e in _groups(offs)])
    torch.testing.assert_close(grouped_mm_t(x, grad, offs), per_expert)
    torch.testing.assert_close(grouped_mm_t(x[:, :7], grad, offs), per_expert[:, :7])


def _logits(module: torch.nn.Module, name: str) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(**make_batch(name, 3, 9, seed=7)).logits


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_adapter_files_round_trip_with_peft_both_ways(name, tmp_path):
    """References: ``PeftModel.from_pretrained`` of the adapter `save_adapter` wrote (its logits),
    and a PEFT model with its own init and a random B saved with ``save_pretrained`` (PEFT's own
    ``"all-linear"`` config on the families it converts, the saved target_parameters on Qwen2-MoE),
    loaded into gm with `load_adapter` (its logits)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, gm = _pair(name)
    gm = copy.deepcopy(gm)
    save_adapter(gm, tmp_path / "ours")
    with warnings.catch_warnings(action="ignore"):
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, name), _logits(gm, name), atol=2e-5, rtol=0)

    if name in PEFT_CONVERTS:
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
    else:
        config = _peft(model, gm).peft_config["default"]
    with warnings.catch_warnings(action="ignore"):
        theirs = get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(gm, tmp_path / "peft")
    torch.testing.assert_close(_logits(gm, name), _logits(theirs, name), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_merged_model_equals_gm_and_peft_merge_and_unload(name):
    """References: gm's logits (the merged model computes them without adapters), and PEFT's
    ``merge_and_unload`` of the same adapters (every expert weight, each ``W_e + s·B_e A_e``)."""
    model, gm = _pair(name)
    merged = merge(gm, copy.deepcopy(model))
    torch.testing.assert_close(_logits(merged, name), _logits(copy.deepcopy(gm), name), atol=2e-5, rtol=0)
    with warnings.catch_warnings(action="ignore"):
        peft_merged = _peft(model, gm).merge_and_unload()
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(merged.get_parameter(a.weight), peft_merged.get_parameter(a.weight),
                                   atol=1e-6, rtol=1e-5, msg=a.weight)


def test_optimizer_corrects_each_experts_gradient_with_its_own_A():
    """Reference: the paper's correction per expert, ``grad_B_e @ pinv(A_e A_e^T + 1e-8 I) / s^2``
    with ``A_e = lora_A.view(E, r, in)[e]`` and ``B_e = lora_B.view(out, r, E)[:, :, e]``, read
    back from one step of the documented update with betas (0, 0), no bias correction and a large
    eps: ``B -= lr * g / (|g| + eps)``, which `g` solves exactly."""
    _, gm = _pair("mixtral")
    gm = copy.deepcopy(gm)
    gm.zero_grad(set_to_none=True)
    gm(**make_batch("mixtral", *SHAPE, seed=3)).loss.backward()
    lr, eps = 1.0, 1e3
    opt = create_lorafa_optimizer(gm, lr=lr, betas=(0.0, 0.0), eps=eps, correct_bias=False)
    with torch.no_grad():  # B = 0 before the step: the step is -B after it, without cancellation
        for a in gm.lorafa.adapters:
            gm.get_parameter(f"{a.path}.lora_B.weight").zero_()
    opt.step()
    for a in gm.lorafa.adapters:
        lora_B = gm.get_parameter(f"{a.path}.lora_B.weight")
        step = -lora_B.detach().double()
        corrected = step * eps / (lr - step.abs())  # g from lr * g / (|g| + eps)
        lora_A = gm.get_parameter(f"{a.path}.lora_A.weight").double().view(a.num_experts, a.r, -1)
        grad = lora_B.grad.double().view(a.out_features, a.r, a.num_experts)
        expected = torch.empty_like(grad)
        for e in range(a.num_experts):
            gram = lora_A[e] @ lora_A[e].T + 1e-8 * torch.eye(a.r, dtype=torch.float64)
            expected[:, :, e] = grad[:, :, e] @ torch.linalg.pinv(gram) / a.scaling**2
        expected = expected.view(lora_B.shape)
        assert (corrected - expected).norm() <= 1e-5 * expected.norm(), a.path  # float32 pinv: 4e-7
    assert any(a.num_experts == 4 for a in gm.lorafa.adapters)


def test_trainer_trains_the_expert_adapters_as_peft(tmp_path):
    """Reference: HF Trainer on PEFT LoRA with A frozen (the same A and B), the same arguments
    (test_trainer's: batch 2 x 2 accumulation steps, AdamW 1e-2): the same logged losses and final
    lora_B, experts' and router's included."""
    from test_trainer import _train

    model, gm = _pair("mixtral")
    ref = _peft(model, gm)
    _, ours = _train(gm, tmp_path / "gm", steps=3)
    _, theirs = _train(ref, tmp_path / "peft", steps=3)
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(gm.get_parameter(f"{a.path}.lora_B.weight"),
                                   ref.base_model.model.get_submodule(a.path).lora_B["default"].weight,
                                   atol=1e-5, rtol=1e-4, msg=a.path)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_other_calls_and_generate_equal_peft(name):
    """Reference: PEFT LoRA (A frozen, the same A and B) called without labels and generating
    greedily: the same logits and tokens (a call other than the captured one runs the model with the
    experts' and routers' weights W + s·B A, as PEFT's ParamWrapper does)."""
    model, gm = _pair(name)
    ref = _peft(model, gm)
    gm.eval(), ref.eval()
    batch = make_batch(name, 3, 10, seed=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, ref(**inputs).logits, atol=2e-5, rtol=0)
    prompt = batch["input_ids"][:, :4]
    tokens = gm.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, ref.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
