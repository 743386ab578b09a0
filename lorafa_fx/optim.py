"""The LoRA-FA optimizer: AdamW on each ``lora_B``, with the paper's gradient correction.

``create_lorafa_optimizer(gm, lr)`` builds a `LoraFAOptimizer` for a GraphModule returned by
`lorafa_fx.transform`. Its math is PEFT's ``LoraFAOptimizer``
(``peft/optimizers/lorafa.py``, peft 0.21.2; line numbers below are that file's), which is
transformers' former ``adamw-hf`` AdamW with the gradient of ``B`` replaced. For an adapter
with frozen ``A`` (``(r, in)``), trained ``B`` (``(out, r)``), scaling ``s`` and step ``t``::

    g  = (1 / s**2) * grad_B @ pinv(A @ A.T + delta * I)      delta = 1e-8       (L161-L173)
    m  = beta1 * m + (1 - beta1) * g                                              (L181)
    v  = beta2 * v + (1 - beta2) * g * g                                          (L182)
    B -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)           (L184-L190)
    B -= lr * weight_decay * B           # on the already-updated B               (L191-L192)

An MoE's experts adapter (``lora_A`` ``(E·r, in)``, ``lora_B`` ``(out, E·r)``, PEFT's layout: ``A_e =
lora_A.view(E, r, in)[e]``, ``B_e = lora_B.view(out, r, E)[:, :, e]``) is E adapters: each
``B_e``'s gradient is corrected with its own ``A_e``. (PEFT's optimizer would invert the Gram
matrix of the whole folded ``lora_A``, mixing experts, in an order that does not match
``lora_B``'s columns.)

Every other trainable parameter (``modules_to_save``) takes the same update with ``g = grad``
(L195-L226). Two consequences differ from `torch.optim.AdamW` with the same arguments:
``eps`` is added to ``sqrt(v)`` before the bias correction, not to ``sqrt(v / (1 - beta2**t))``,
and the decoupled weight decay multiplies the updated weight instead of the old one. Exactly,
this update is `torch.optim.AdamW` run with ``lr * (1 - lr * wd)``, ``wd / (1 - lr * wd)`` and
``eps / sqrt(1 - beta2**t)`` at step ``t``. ``gradient_correction=False`` keeps this update and
only drops the correction, so the two settings differ by the correction alone.

What differs from PEFT is cost, not values:

* ``A`` is frozen, so ``pinv(A A^T + delta I) / s**2`` (``r x r``) is computed once per adapter
  in float32 and cached; PEFT recomputes it for every adapter at every step (L164-L165). The
  cache is not optimizer state (``state_dict`` holds only ``step``, ``exp_avg``,
  ``exp_avg_sq``); it is rebuilt from ``A`` when ``A`` changes in place or moves.
* The correction is one ``torch.bmm`` per group of adapters with the same ``(out, r)``, and
  the AdamW update is ``torch._foreach_*`` kernels over all parameters, where PEFT runs a
  Python loop of about 15 tensor ops per parameter.
* ``A`` and ``B`` are paired through ``gm.lorafa.adapters``; PEFT pairs them by the order of
  parameter names containing ``"lora"`` (L117-L129).
* State is keyed by parameter, as in every torch optimizer: ``state_dict()`` /
  ``load_state_dict()`` (HF Trainer's ``optimizer.pt``) round-trip it, and a resumed run
  continues bit for bit like the uninterrupted one (tests/test_resume.py). The states follow
  their parameter when the model moves to another device after the optimizer was built
  (``gm.to("cuda")``); ``load_state_dict`` casts saved states to the parameters' devices.
* The correction's matmul runs in float32. PEFT runs it under bfloat16 autocast whenever
  ``accelerate.utils.is_bf16_available()`` is true (L169-L171), which includes every CPU, so
  its corrected gradient carries bfloat16 rounding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .errors import ConfigError, DistributedPlanError
from .state import state_of

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer"]

#: Ridge added to ``A A^T`` before the pseudo-inverse, PEFT's ``delta``.
PINV_DELTA = 1e-8


@dataclass(frozen=True)
class _Pair:
    path: str
    lora_A: torch.Tensor
    scaling: float
    experts: int = 1


class LoraFAOptimizer(Optimizer):
    """AdamW (PEFT's LoRA-FA flavour) over a LoRA-FA GraphModule's trainable parameters.

    Param group 0 holds every ``lora_B`` (key ``"adapter_paths"`` names their adapters, in
    order; ``"gradient_correction"`` switches the correction). Group 1, present when the
    model has ``modules_to_save``, holds the other trainable parameters. Both groups carry
    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``correct_bias``, read at every step,
    so LR schedulers work as usual. See the module docstring for the exact update.
    """

    def __init__(
        self,
        gm: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        gradient_correction: bool = True,
        correct_bias: bool = True,
    ) -> None:
        _check_hyperparameters(lr, weight_decay, betas, eps)
        pairs = _adapter_pairs(gm)
        adapter_ids = {id(b) for b in pairs} | {id(p.lora_A) for p in pairs.values()}
        others = [p for p in gm.parameters() if p.requires_grad and id(p) not in adapter_ids]
        groups: list[dict[str, Any]] = [{
            "params": list(pairs),
            "adapter_paths": [p.path for p in pairs.values()],
            "gradient_correction": bool(gradient_correction),
        }]
        if others:
            groups.append({"params": others})
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(groups, defaults)
        self._pairs: dict[torch.Tensor, _Pair] = pairs
        # (ids of the Bs of one (out, r) group) -> (stamp of their As, stacked scaled inverses)
        self._inverses: dict[tuple[int, ...], tuple[tuple[tuple[int, int], ...], torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise ValueError("LoraFAOptimizer does not support sparse gradients; use dense embeddings.")
            if "adapter_paths" in group and group["gradient_correction"]:
                grads = self._corrected(params, grads)
            self._adamw_hf(group, params, grads)
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a ``state_dict`` saved from an optimizer of a model with the same adapters."""
        saved = [list(g.get("adapter_paths") or []) for g in state_dict["param_groups"]]
        ours = [list(g.get("adapter_paths") or []) for g in self.param_groups]
        if saved != ours:
            raise ValueError(
                "This optimizer state was saved for different adapters (or a different param group "
                "layout) than this optimizer's. Build the optimizer with create_lorafa_optimizer on "
                "a model transformed with the same LoraFAConfig before loading its state."
            )
        super().load_state_dict(state_dict)

    def _corrected(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        # One bmm per (out, r, E) shape: adapters of equal shape share a single kernel launch,
        # each of their E experts (1 for a linear) a (out, r) block of it.
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            buckets[(g.shape, g.device, g.dtype, self._pairs[params[i]].experts)].append(i)
        out = list(grads)
        for (shape, _, dtype, experts), idx in buckets.items():
            inverses = self._scaled_inverses([params[i] for i in idx])  # (n·E, r, r)
            rows, r = shape[0], shape[1] // experts
            # (out, r·E), expert last -> (n·E, out, r)
            blocks = torch.stack([grads[i] for i in idx]).view(len(idx), rows, r, experts).permute(0, 3, 1, 2)
            corrected = torch.bmm(blocks.reshape(-1, rows, r).to(torch.float32), inverses).to(dtype)
            corrected = corrected.view(len(idx), experts, rows, r).permute(0, 2, 3, 1).reshape(len(idx), *shape)
            for i, c in zip(idx, corrected.unbind(0)):
                out[i] = c
        return out

    def _scaled_inverses(self, bs: list[torch.Tensor]) -> torch.Tensor:
        pairs = [self._pairs[b] for b in bs]
        # A is frozen, but a user may still load new weights into it or move the model:
        # the version counter and storage pointer catch both without a per-step recompute.
        stamp = tuple((p.lora_A._version, p.lora_A.data_ptr()) for p in pairs)
        key = tuple(id(b) for b in bs)
        hit = self._inverses.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        inverses = torch.cat([_scaled_inverse(p.lora_A, p.scaling, p.experts) for p in pairs])
        inverses = inverses.to(bs[0].device)
        self._inverses[key] = (stamp, inverses)
        return inverses

    def _adamw_hf(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        # Bias correction depends on each parameter's own step count (a parameter without a
        # gradient skips a step, as in PEFT), and foreach kernels want one device and dtype.
        buckets: dict[tuple[Any, ...], tuple[list[torch.Tensor], ...]] = defaultdict(lambda: ([], [], [], []))
        for p, g in zip(params, grads):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["exp_avg"].device != p.device:  # the model moved (gm.to("cuda")) after its last step
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].to(p.device)
            state["step"] += 1
            bucket = buckets[(state["step"], p.device, p.dtype)]
            for lst, t in zip(bucket, (p, g, state["exp_avg"], state["exp_avg_sq"])):
                lst.append(t)
        beta1, beta2 = group["betas"]
        for (step, _, _), (ps, gs, exp_avgs, exp_avg_sqs) in buckets.items():
            _adamw_hf_foreach(
                ps, gs, exp_avgs, exp_avg_sqs, step=step, lr=float(group["lr"]), beta1=beta1,
                beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                correct_bias=group["correct_bias"],
            )


def create_lorafa_optimizer(
    gm: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    gradient_correction: bool = True,
    correct_bias: bool = True,
) -> LoraFAOptimizer:
    """The LoRA-FA optimizer for ``gm = lorafa_fx.transform(...)``.

    Args:
        gm: the GraphModule returned by `lorafa_fx.transform`; its adapters (``gm.lorafa.adapters``) pair
            each frozen ``lora_A`` with its ``lora_B``.
        lr: learning rate (PEFT's and the paper's LoRA-FA use AdamW's usual LoRA values).
        weight_decay: decoupled weight decay, applied after the Adam step as in PEFT.
        betas: Adam's moment coefficients (PEFT's ``create_lorafa_optimizer`` fixes these).
        eps: added to ``sqrt(v)`` before bias correction (PEFT's default ``1e-6``).
        gradient_correction: multiply each ``grad_B`` by ``(A A^T)^-1 / scaling**2`` (the
            paper's closed-form correction); ``False`` gives the same AdamW without it.
        correct_bias: Adam's bias correction, PEFT's ``correct_bias``.

    Returns:
        a `LoraFAOptimizer`: group 0 the ``lora_B`` weights, group 1 (if any) the
        ``modules_to_save`` parameters.
    """
    if any(isinstance(p, DTensor) for p in gm.parameters()):
        raise DistributedPlanError(
            "create_lorafa_optimizer does not support FSDP2-sharded parameters (sharding='full'): train them "
            "with torch.optim.AdamW, or use sharding='none' (DDP) for the LoRA-FA optimizer."
        )
    return LoraFAOptimizer(
        gm, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
        gradient_correction=gradient_correction, correct_bias=correct_bias,
    )


def _adamw_hf_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    # Op for op PEFT's per-parameter sequence (lorafa.py L181-L192), so results agree to the bit.
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    step_size = lr
    if correct_bias:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


def _scaled_inverse(lora_A: torch.Tensor, scaling: float, experts: int) -> torch.Tensor:
    """``(E, r, r)``: each expert's ``pinv(A_e A_e^T + delta I) / scaling**2``."""
    a = lora_A.detach().to(torch.float32).view(experts, -1, lora_A.shape[-1])
    gram = a @ a.mT + PINV_DELTA * torch.eye(a.shape[1], device=a.device)
    # pinv, not inv: PEFT's choice, and it stays finite if A is rank-deficient (e.g. init "ones").
    return torch.linalg.pinv(gram) / scaling**2


def _adapter_pairs(gm: nn.Module) -> dict[torch.Tensor, _Pair]:
    state = state_of(gm)
    if state is None:
        raise ValueError(
            f"create_lorafa_optimizer needs the GraphModule returned by lorafa_fx.transform(model, "
            f"example_inputs=..., config=...); this {type(gm).__name__} has no LoRA-FA adapters (gm.lorafa). "
            "Pass the transformed module, not the original model."
        )
    adapters = state.adapters
    if not adapters:
        raise ValueError(
            "The transformed module has no adapters (gm.lorafa.adapters is empty), so LoRA-FA has "
            "nothing to train; choose target_modules that the model's forward calls."
        )
    pairs: dict[torch.Tensor, _Pair] = {}
    for a in adapters:
        lora_A = gm.get_parameter(f"{a.path}.lora_A.weight")
        lora_B = gm.get_parameter(f"{a.path}.lora_B.weight")
        if tuple(lora_A.shape) != (a.folded_r, a.in_features) or tuple(lora_B.shape) != (a.out_features, a.folded_r):
            experts = f" x {a.num_experts} experts" if a.num_experts > 1 else ""
            raise ValueError(
                f"Adapter {a.path}: lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not "
                f"match r={a.r}{experts}, in={a.in_features}, out={a.out_features}; re-run lorafa_fx.transform "
                "instead of replacing adapter weights with tensors of another shape."
            )
        if lora_A.requires_grad:
            raise ValueError(
                f"{a.path}.lora_A.weight requires grad, but LoRA-FA keeps A frozen (the gradient "
                "correction assumes it). Call .requires_grad_(False) on it, or train A with a plain "
                "LoRA optimizer such as torch.optim.AdamW."
            )
        pairs[lora_B] = _Pair(a.path, lora_A, float(a.scaling), a.num_experts)
    return pairs


def _check_hyperparameters(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
    if not _finite_at_least_0(lr):
        raise ConfigError(f"lr={lr!r} must be a finite number >= 0, e.g. 1e-4.")
    if not _finite_at_least_0(weight_decay):
        raise ConfigError(f"weight_decay={weight_decay!r} must be a finite number >= 0 (0 disables it).")
    pair = isinstance(betas, (tuple, list)) and len(betas) == 2
    if not pair or not all(_finite_at_least_0(b) and b < 1.0 for b in betas):
        raise ConfigError(f"betas={betas!r} must be two floats in [0, 1), e.g. (0.9, 0.999).")
    if not _finite_at_least_0(eps):
        raise ConfigError(f"eps={eps!r} must be a finite number >= 0, e.g. 1e-6 (PEFT's default).")


def _finite_at_least_0(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x < math.inf
