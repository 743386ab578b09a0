"""Pass (speed): one GEMM for the frozen linears that read the same input.

Linears that read one tensor ``x`` — q/k/v, gate/up, and in a LoRA-FA graph every base
product ``x W^T`` together with its adapter's down-projection ``x A^T`` — become::

    fused = x [W_1; ...; W_k]^T (+ [b_1; ...; b_k])        y_1, ..., y_k = split(fused)

so ``x`` is read once in forward and ``grad_x = grad_fused [W_1; ...; W_k]`` is one GEMM in
backward. Only frozen weights are fused (``aten.linear`` on a ``get_attr`` parameter with
``requires_grad=False``): a trained ``lora_B`` or a ``modules_to_save`` layer keeps its own.
Run it on the transformed module (after `transform` froze the base).

**No weight copy.** The stacked weight is not a concatenated copy: the pass allocates one new
buffer per group, copies the weights in and re-points each parameter at its rows
(``p.data = joint[rows]``; the same `nn.Parameter` object, so the user's model still shares
it); the old storages are freed. Base weights stay stored once (a 7B model does not need 2x);
while the pass runs, one group's weights exist twice. The joint tensor is a non-persistent
buffer ``<common parent module>.lorafa_fused_weight`` (not in ``state_dict``); the parameters'
``state_dict`` entries are views sharing its storage (``safetensors.torch.save_model``
handles that, ``save_file`` wants clones). A ``.to()``/``.half()`` after the pass converts the
buffer and the parameters one by one, so they stop sharing; the next eager call re-points
the parameters at the converted buffer (copying their values in first, so a
``load_state_dict`` in between is kept). Under `torch.compile` that check is skipped. Biases
(``out`` values each) are copied into a joint bias buffer, not shared.

**Saved tensors.** A split part is a strided view of ``fused``. Where a part may be kept for
backward (the LoRA-FA ``xa`` with ``scaling == 1`` is, by ``linear(xa, B)``) it is cloned
contiguous, so backward keeps b·s·r values and not the whole fused output; parts read only
by ops that keep no input (``add``/``sub``: the LoRA-FA ``out`` node, a residual add;
``mul``/``div`` by a number: ``scaling * x A^T``) stay views.

Reads ``node.meta["val"]``, ``["lorafa"]`` and ``["recompute"]``, and the parameters'
``requires_grad``. Writes ``node.meta["lorafa"] = {"role": "fused", "parts": [weight
targets]}`` on each fused linear; the node that stands for a replaced linear (its split part
or that part's clone) takes over its ``meta["lorafa"]`` and ``meta["recompute"]``, so
`annotate_saved_tensors` may run before or after this pass.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ._graph import META_KEY, free_target, new_node, set_fake_val

aten = torch.ops.aten

#: Users that never keep their input for backward: a part read only by these stays a view.
NON_SAVING_USERS = (aten.add.Tensor, aten.sub.Tensor)
#: Users that keep no input when their other operand is a number (autograd stores the number).
SCALAR_NON_SAVING_USERS = (aten.mul.Tensor, aten.div.Tensor)

#: Meta keys the node standing for a replaced linear takes over from it.
_CARRIED_META = (META_KEY, "recompute")


class FuseLinears(PassBase):
    """Fuses each group of >= 2 frozen ``aten.linear`` nodes that read the same input."""

    def group_keys(self, gm: fx.GraphModule) -> dict[fx.Node, Hashable]:
        """Linear nodes to fuse, by group: nodes with equal keys are fused together."""
        return {
            n: n.args[0] for n in gm.graph.find_nodes(op="call_function", target=aten.linear.default)
            if _is_frozen_linear(gm, n)
        }

    def call(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups: dict[Hashable, list[fx.Node]] = {}
        for node, key in self.group_keys(gm).items():
            groups.setdefault(key, []).append(node)
        joints: dict[tuple[str, ...], str] = {}  # weight targets -> joint buffer target
        claimed: dict[str, tuple[str, ...]] = {}  # weight target -> the group it lives in
        modified = False
        for nodes in groups.values():
            nodes = _compatible(gm, sorted(nodes, key=order.__getitem__))
            names = tuple(n.args[1].target for n in nodes)
            if len(nodes) < 2 or len(set(names)) < len(names):
                continue
            if any(claimed.get(w, names) != names for w in names):
                continue  # a weight already lives in another group's buffer
            if names not in joints:
                joints[names] = _rehome(gm, nodes)
                claimed.update(dict.fromkeys(names, names))
            _rewrite(gm, nodes, joints[names])
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def _bias(node: fx.Node) -> fx.Node | None:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _frozen_param(gm: fx.GraphModule, node: object) -> torch.nn.Parameter | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return None if p.requires_grad else p


def _is_frozen_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    w = _frozen_param(gm, node.args[1])
    bias = _bias(node)
    return (
        w is not None and w.dim() == 2 and w.is_contiguous() and w.dtype.is_floating_point
        and (bias is None or _frozen_param(gm, bias) is not None)
    )


def _compatible(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    """The nodes whose weights match the first one's dtype, device and in_features."""
    first = gm.get_parameter(nodes[0].args[1].target)
    return [
        n for n in nodes
        if (p := gm.get_parameter(n.args[1].target)).dtype == first.dtype and p.device == first.device
        and p.shape[1] == first.shape[1]
    ]


@torch.no_grad()
def _rehome(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> str:
    """Move the group's weights into one new storage; return the joint buffer's target."""
    weights = [gm.get_parameter(n.args[1].target) for n in nodes]
    joint = weights[0].new_empty(sum(w.shape[0] for w in weights), weights[0].shape[1])
    _point_into(joint, weights)
    path = _common_path([n.args[1].target for n in nodes])
    owner = gm.get_submodule(path)
    target = free_target(gm, path, "lorafa_fused_weight")
    leaf = target.rpartition(".")[2]
    owner.register_buffer(leaf, joint, persistent=False)
    biases = [_bias(n) for n in nodes]
    if any(b is not None for b in biases):
        owner.register_buffer(f"{leaf}_bias", torch.cat([
            gm.get_parameter(b.target).detach() if b is not None else w.new_zeros(w.shape[0])
            for b, w in zip(biases, weights)
        ]), persistent=False)
    return target


def _point_into(joint: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy `params` into consecutive rows of `joint` and make each one a view of its rows."""
    offset = 0
    for p in params:
        rows = joint[offset:offset + p.shape[0]]
        rows.copy_(p)
        p.data = rows
        offset += p.shape[0]


def _common_path(targets: Sequence[str]) -> str:
    common: list[str] = []
    for parts in zip(*(t.split(".")[:-1] for t in targets)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def joint_weight(joint: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """`joint`, after checking (eagerly) that `params` are still views of its rows.

    A ``.to()``/``.half()`` converts the buffer and the parameters one by one, so they stop
    sharing storage and the base weights would be stored twice; this re-points them at the
    converted buffer, copying the parameters' values in first.
    """
    if torch.compiler.is_compiling() or is_fake(joint) or joint.device.type == "meta":
        return joint  # traced or run by the cost model: no storage to compare
    if params[0].data_ptr() != joint.data_ptr():
        with torch.no_grad():
            _point_into(joint, params)
    return joint


def _rewrite(gm: fx.GraphModule, nodes: list[fx.Node], joint: str) -> None:
    graph = gm.graph
    first, x = nodes[0], nodes[0].args[0]
    sizes = [gm.get_parameter(n.args[1].target).shape[0] for n in nodes]
    with graph.inserting_before(first):
        params = [new_node(graph, first, "get_attr", n.args[1].target, ()) for n in nodes]
        joint_node = _buffer(gm, first, joint)
        weight = new_node(graph, first, "call_function", joint_weight, (joint_node, *params))
        weight.meta["val"] = joint_node.meta.get("val")
        bias = (_buffer(gm, first, f"{joint}_bias"),) if any(_bias(n) is not None for n in nodes) else ()
        fused = new_node(graph, first, "call_function", aten.linear.default, (x, weight, *bias))
        set_fake_val(fused, aten.linear.default, gm)
        fused.meta[META_KEY] = {"role": "fused", "parts": [n.args[1].target for n in nodes]}
        split = new_node(graph, first, "call_function", aten.split_with_sizes.default, (fused, sizes, -1))
        set_fake_val(split, aten.split_with_sizes.default, gm)
        for i, node in enumerate(nodes):
            part = new_node(graph, node, "call_function", operator.getitem, (split, i))
            if isinstance(vals := split.meta.get("val"), (list, tuple)):
                part.meta["val"] = vals[i]
            if not all(_keeps_no_input(u) for u in node.users):
                part = new_node(graph, node, "call_function", aten.clone.default, (part,),
                                {"memory_format": torch.contiguous_format})
                set_fake_val(part, aten.clone.default, gm)
            for key in _CARRIED_META:
                if key in node.meta:
                    part.meta[key] = node.meta[key]
            node.replace_all_uses_with(part)
    for node in nodes:
        graph.erase_node(node)


def _keeps_no_input(user: fx.Node) -> bool:
    if user.target in SCALAR_NON_SAVING_USERS:
        return not any(isinstance(a, fx.Node) for a in (*user.args, *user.kwargs.values())[1:])
    return user.target in NON_SAVING_USERS


def _buffer(gm: fx.GraphModule, origin: fx.Node, target: str) -> fx.Node:
    node = new_node(gm.graph, origin, "get_attr", target, ())
    vals = [v for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)]
    if (mode := detect_fake_mode(vals)) is not None:
        node.meta["val"] = mode.from_tensor(gm.get_buffer(target), static_shapes=True)
    return node
