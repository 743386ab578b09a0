"""Pass: a tensor saved for backward keeps its own bytes alive, not a larger buffer's.

A view shares its base's storage, so an op that saves a view for backward keeps the whole
base alive until then. GPT-NeoX and Phi-3 split one fused q/k/v projection with views
(``qkv.view(b, s, h, 3·hd).transpose(1, 2).chunk(3, -1)``): q and k go on through rotary
(new tensors), but attention saves ``value``, a view, and so keeps the fused b·s·3d buffer
where eager PEFT keeps b·s·d.

This pass gives each op that saves such a view a compact copy of it (``aten.clone`` in
contiguous format: the same values) where that frees bytes: every use of the buffer is
known (a view of it, an op that keeps nothing of it, or an op that keeps its input), and the
views kept need fewer bytes together than the buffer. Where the buffer itself (or a view as
large) is kept, or a use is unknown (it might keep the buffer), nothing changes: a copy would
only add bytes. The op that made the buffer may keep it too (``exp``, ``tanh``, softmax keep
their result for backward: Mamba's ``exp`` of the discretised state matrix, whose per-step
slices the scan keeps): that is asked of autograd itself, by running the op once on fake
copies of its inputs and comparing the tensors it saves with its result; an op that cannot be
asked (a submodule, a Python function) counts as keeping it.

Known to keep their input: attention (``scaled_dot_product_attention`` and its kernels, the
`SDPAttention` submodules: q, k and v), the matmuls (their two factors), ``mul`` (the operand
the other one's gradient reads, if that one may need a gradient: rotary's ``q * cos`` keeps
nothing of ``q``), this project's lean Functions (`gated_activation`, `rms_norm`,
`RecomputedPointwise`). Known to keep nothing of it: `_KEEP_NOTHING` and dropout modules.

Reads ``node.meta["val"]``: a view's fake value shares its base's fake storage, so one pass
over the graph groups the nodes that alias one buffer. Each copy inherits its view's
``nn_module_stack``/``stack_trace`` and gets its ``val``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.multiprocessing.reductions import StorageWeakRef

from ..graph import new_node, pass_result, set_fake_val
from .lean_gated_mlp import gated_activation
from .lean_norms import rms_norm
from .lean_pointwise import RecomputedPointwise, grad_nodes
from .simplify_attention import SDPAttention

aten = torch.ops.aten

_ATTENTION = frozenset({
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
})

#: Op -> the arguments it keeps for backward.
_KEEPS_ARGS = {
    **{op: slice(0, 3) for op in _ATTENTION},
    aten.mm.default: slice(0, 2), aten.bmm.default: slice(0, 2), aten.matmul.default: slice(0, 2),
    aten.addmm.default: slice(1, 3), aten.baddbmm.default: slice(1, 3),
    gated_activation: slice(0, 2), rms_norm: slice(0, 2),
}

#: Ops whose derivative formulas read none of their tensor inputs.
_KEEP_NOTHING = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cat.default, aten.stack.default,
    aten.clone.default, aten.contiguous.default, aten.reshape.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.sum.dim_IntList, aten.mean.dim,
    aten.constant_pad_nd.default, aten.pad.default,
})


class CompactSavedViews(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        grad = grad_nodes(gm)
        modified = False
        for nodes in _buffers(gm.graph).values():
            kept = _kept_views(gm, nodes, grad)
            if (kept and statically_known_true(sum(map(_compact_bytes, kept)) < _buffer_bytes(nodes[0]))
                    and not _keeps_its_result(nodes[0], grad)):
                for view, keepers in kept.items():
                    _give_copy(gm, view, keepers)
                modified = True
        return pass_result(gm, modified)


def _tensors(node: fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _buffers(graph: fx.Graph) -> dict[StorageWeakRef, list[fx.Node]]:
    """The nodes aliasing each buffer (a multi-view op such as ``chunk`` under each of its
    views' buffers), in graph order."""
    groups: dict[StorageWeakRef, list[fx.Node]] = defaultdict(list)
    for n in graph.nodes:
        for key in dict.fromkeys(StorageWeakRef(t.untyped_storage()) for t in _tensors(n)):
            groups[key].append(n)
    return groups


def _kept_views(gm: fx.GraphModule, nodes: list[fx.Node], grad: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """{view: the ops keeping it} of a buffer's nodes, or {} if any use is not known."""
    members = set(nodes)
    kept: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for n in nodes:
        if n.op not in ("call_function", "call_module"):  # weights and inputs outlive the step
            return {}
        for user in n.users:
            if user in members:
                continue
            keeps = _keeps(gm, user, n, grad)
            if keeps is None:
                return {}
            if keeps:
                kept[n].append(user)
    return kept


def _keeps(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, grad: set[fx.Node]) -> bool | None:
    """Whether `user` keeps `arg` for backward; None if not known."""
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if isinstance(module, SDPAttention):
            return arg in user.args[:3]
        if isinstance(module, RecomputedPointwise):
            return True
        return False if isinstance(module, torch.nn.Dropout) else None
    if user.op != "call_function":  # the graph's output: the caller keeps it
        return None
    if user.target in _KEEPS_ARGS:
        return arg in user.args[_KEEPS_ARGS[user.target]]
    if user.target == aten.mul.Tensor and len(user.args) == 2:
        a, b = user.args
        return (a is arg and b in grad) or (b is arg and a in grad)
    return False if user.target in _KEEP_NOTHING else None


def _keeps_its_result(node: fx.Node, grad: set[fx.Node]) -> bool:
    """Whether autograd keeps `node`'s result for its backward: the op run on fake copies of its
    inputs (those in `grad` requiring a gradient), its saved tensors compared with its result."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return True
    mode = detect_fake_mode([a.meta.get("val") for a in node.all_input_nodes])
    if mode is None:
        return True

    def fake(a: object) -> object:
        val = a.meta.get("val") if isinstance(a, fx.Node) else a
        if isinstance(val, torch.Tensor):
            return val.detach().requires_grad_(a in grad and val.is_floating_point())
        return val

    saved: list[torch.Tensor] = []
    args, kwargs = pytree.tree_map(fake, (node.args, node.kwargs))
    with mode, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = node.target(*args, **kwargs)
    ours = {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)}
    return any(StorageWeakRef(t.untyped_storage()) in ours for t in saved)


def _compact_bytes(node: fx.Node) -> int:
    val = node.meta["val"]
    return val.numel() * val.element_size()


def _buffer_bytes(node: fx.Node) -> int:
    return _tensors(node)[0].untyped_storage().nbytes()


def _give_copy(gm: fx.GraphModule, view: fx.Node, keepers: list[fx.Node]) -> None:
    with gm.graph.inserting_after(view):
        copy = new_node(gm.graph, view, "call_function", aten.clone.default, (view,),
                        {"memory_format": torch.contiguous_format})
    set_fake_val(copy, aten.clone.default, gm)
    for user in keepers:
        user.replace_input_with(view, copy)
