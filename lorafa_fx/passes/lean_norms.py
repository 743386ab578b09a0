"""Pass: RMSNorms keep their input in its own dtype, not the fp32 copy autograd keeps.

transformers' RMSNorms upcast before squaring. Captured (after `follow_param_dtype`), a
LlamaRMSNorm (and the many models that copy it: Qwen2, Mistral, ...) is::

    xf = to.dtype(x, float32)                      the upcast (absent if the code has none)
    rstd = rsqrt(add(mean.dim(pow(xf, 2), [-1], True), eps))
    out = mul(w, to.dtype(mul(xf, rstd), dtype_of(w)))

T5LayerNorm multiplies ``x`` itself by ``rstd`` and, captured in fp32, has no cast before
``w *`` (its half-precision branch is not taken); GemmaRMSNorm scales in fp32 and casts last:
``type_as(mul(mul(xf, rstd), add(to.dtype(w, float32), 1.0)), x)``. Autograd keeps ``xf``
(b·s·d fp32 values, twice a bf16 input's bytes; T5 keeps ``x`` as well) and ``rstd``.

This pass replaces each chain by one call of `rms_norm`, an `autograd.Function` whose forward
runs the same ops in the same order (the same output, bit for bit) and keeps only ``x`` in its
own dtype, ``rstd`` (b·s fp32 values) and the scale (the weight, kept by reference; Gemma's d
values); backward recomputes ``xf * rstd`` and applies autograd's own derivative formulas in
reverse. The gradients are autograd's bits, except where autograd sums several gradients of one
tensor in an order the Function cannot follow: captured in fp32 the upcast is ``x`` itself,
and x's gradients from the residual, the square and the product add up in another order (an
ulp). The scale gets a gradient only when it requires one (``modules_to_save``). The Function
is what `torch.compile` traces, so the compiled step keeps the same tensors.

Matched, from each ``rsqrt`` whose chain lies in one module and whose intermediate results are
read only inside it: the optional upcast ``to.dtype``, ``pow.Tensor_Scalar(·, 2)``, ``mean.dim``
over the last dim with keepdim, ``add.Tensor`` of a number, ``rsqrt``, ``mul(xf or x, rstd)``,
then in this order, each optional and in the same module, ``to.dtype``, ``mul`` by a tensor the
result does not outgrow (the weight; Gemma's ``1 + w.float()`` stays outside, computed from the
weight), ``to.dtype`` or ``type_as``. A dtype argument may be a node (`follow_param_dtype`'s
``dtype_of``): the call reads it at run time, so ``gm.to(torch.bfloat16)`` still casts as the
model does. Not matched: Gemma captured in fp32, layer 0's norm (`follow_param_dtype` takes
its ``.float()`` of the scaled embedding for a cast back, so the residual still reads ``xf``).

In bf16 each norm whose input needs grad keeps 2 bytes less per input element (T5: 4).
LayerNorm (``aten.layer_norm``: GPT-2, RoBERTa) is lean already: it keeps its input in its own
dtype with the per-row mean and rstd. Under autocast with fp32 weights the residual stream is
fp32 and ``xf`` is ``x`` itself: the rewrite keeps the same bytes there.

Reads ``node.meta["nn_module_stack"]`` and ``["val"]``; each call inherits the replaced chain's
last node's ``nn_module_stack``/``stack_trace`` and ``val``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import owner, replace_matches, same_shape
from ..ops.norms import rms_norm

aten = torch.ops.aten


class LeanNorms(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        return replace_matches(gm, aten.rsqrt.default, _match, rms_norm)


def _match(rsqrt: fx.Node) -> tuple[fx.Node, tuple] | None:
    """(the chain's last node, `rms_norm`'s arguments) for the RMSNorm around `rsqrt`, or None."""
    add = rsqrt.args[0]
    if not (_is(add, aten.add.Tensor) and len(add.args) == 2 and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (_is(mean, aten.mean.dim) and mean.args[1] in ([-1], [_ndim(mean) - 1]) and mean.args[2:] == (True,)):
        return None
    pow_ = mean.args[0]
    if not (_is(pow_, aten.pow.Tensor_Scalar) and pow_.args[1] == 2):
        return None
    xf = pow_.args[0]
    x, upcast = _cast_of(xf) or (xf, None)
    normed = _only_user(rsqrt)
    if not (_is(normed, aten.mul.Tensor) and len(normed.args) == 2 and rsqrt in normed.args):
        return None
    factor = normed.args[1] if normed.args[0] is rsqrt else normed.args[0]
    if factor not in (x, xf):
        return None
    chain = ([xf] if upcast is not None else []) + [pow_, mean, add, rsqrt, normed]
    path = owner(rsqrt)[0]
    if any(owner(n)[0] != path for n in chain):
        return None
    end, cast_a, scale, cast_b = normed, None, None, None
    user = _next(end, path)
    if (cast := _cast_of(user)) and cast[0] is end:
        end, cast_a = user, cast[1]
        chain.append(end)
        user = _next(end, path)
    if _is(user, aten.mul.Tensor) and len(user.args) == 2:
        other = user.args[1] if user.args[0] is end else user.args[0]
        if isinstance(other, fx.Node) and other not in chain and same_shape(user, end):
            end, scale = user, other
            chain.append(end)
            user = _next(end, path)
    if (cast := _cast_of(user)) and cast[0] is end:
        end, cast_b = user, cast[1]
        chain.append(end)
    elif _is(user, aten.type_as.default) and user.args[0] is end:
        ref = user.args[1]
        if ref is xf:  # xf's dtype is the upcast's (xf is x itself without an upcast)
            ref = x if upcast is None else upcast
        if ref in chain:
            return None
        end, cast_b = user, ref
        chain.append(end)
    if any(u not in chain for n in chain[:-1] for u in n.users):
        return None
    return end, (x, scale, add.args[1], upcast, cast_a, cast_b, factor is not xf)


def _is(node: object, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target and not node.kwargs


def _cast_of(node: object) -> tuple[fx.Node, torch.dtype | fx.Node] | None:
    """(source, dtype) if `node` is ``to.dtype(source, dtype)``, the dtype a literal or a
    ``dtype_of`` node (`follow_param_dtype`), else None."""
    if _is(node, aten.to.dtype) and len(node.args) == 2 and isinstance(node.args[1], (torch.dtype, fx.Node)):
        return node.args[0], node.args[1]
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _next(node: fx.Node, path: str) -> fx.Node | None:
    """`node`'s only user if it runs in the module at `path` (a cast before a linear, inserted by
    `follow_param_dtype`, belongs to the linear), else None."""
    user = _only_user(node)
    return user if user is not None and owner(user)[0] == path else None


def _ndim(node: fx.Node) -> int:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else -1

