"""Pass: dtype constants that stand for the model's dtype follow the weights at run time.

Export writes every dtype as a literal. Captured from an fp32 model, ``hidden_states.to(
input_dtype)`` (RMSNorm's cast back), ``cos.to(dtype=x.dtype)`` (rotary embedding) and
``torch.zeros(..., dtype=scores.dtype)`` (T5's position bias) all read ``float32``, exactly
like the deliberate upcasts ``hidden_states.to(torch.float32)`` and ``logits.float()``. After
``gm.to(torch.bfloat16)`` the first kind must become bf16 (the eager model casts back to its
dtype) and the second must stay fp32, else a bf16 linear meets an fp32 input and fails.

The graph alone does not say which literal came from a tensor's dtype, so this pass decides
it by following, through the graph, which tensors are in the model's dtype ``F`` (the dtype
of most parameter elements) and which are in a dtype the code chose (tags ``MODEL`` and
``CHOSEN``), as they would be once the weights are cast:

* a cast to ``F`` of a ``MODEL`` tensor (a no-op at capture) is a deliberate upcast when
  ``F`` is fp32/fp64 (kept; its output is ``CHOSEN``), otherwise a cast back (followed);
* a cast to ``F`` of a ``CHOSEN`` floating tensor is a cast back to the model's dtype
  (followed; output ``MODEL``) unless that tensor is itself an upcast seen through views
  (``x.float().expand(...).float()``, kept);
* a cast of integers or booleans to ``F`` is kept when ``F`` is fp32/fp64 (``position_ids
  .float()``), followed otherwise (``mask.to(self.dtype)`` of a bf16 capture);
* ``to(device)`` records the tensor's own dtype: the dtype is dropped, the cast keeps
  whatever dtype the tensor has at run time;
* factories of dtype ``F`` (``zeros``, ``full``, ``new_zeros``, ``*_like``) are followed;
  other ops given a ``dtype`` (``softmax(x, dtype=torch.float32)``) keep it (``CHOSEN``);
  ``type_as(x, y)`` has ``y``'s tag; any other op mixing ``MODEL`` and ``CHOSEN`` floats
  yields ``CHOSEN`` (type promotion to fp32);
* where a ``CHOSEN`` activation meets a ``MODEL`` weight in a linear, ``addmm``, ``mm``,
  ``matmul`` or ``layer_norm`` (a dtype check the model's code made in Python and export
  resolved for fp32, e.g. T5's LayerNorm casting to ``weight.dtype`` only in half precision),
  the activation is cast to the weight's dtype first.

A kept upcast that was a no-op at capture returned its input itself, and export bound every
later use of that tensor to the cast: the residual stream after RMSNorm's
``hidden_states.to(torch.float32)``, the ``logits`` returned after the loss's
``logits.float()``. Its users outside the module it ran in, and the graph's outputs, are
given back the uncast input (the same tensor at capture, so nothing changes there).

"Followed" means the dtype argument becomes a node ``dtype_of(w)``, inserted before its
user, ``w`` the weight in ``F`` closest to the user in the module tree (an outlined layer
reads only its own weights). Captured in fp32 every followed dtype is fp32 again, so the
graph computes what it did; cast to bf16 (or run under autocast) it computes what the eager
model does (`tests/test_mixed_precision.py`: Llama, GPT-2, RoBERTa and T5 match
``model.to(torch.bfloat16)``). Dtype branches of the model's code other than the ones above
stay as captured: transform the model in the dtype it trains in where they matter.

Reads ``node.meta["val"]`` and ``nn_module_stack``; new nodes inherit the user's
``nn_module_stack``/``stack_trace``; ``dtype_of`` nodes carry the dtype as ``meta["val"]``,
inserted casts their input's ``val``.
"""

from __future__ import annotations

import operator
from collections import Counter
from enum import Enum

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import new_node, owner, pass_result
from .follow_input_device import closest_weight, graph_attr

aten = torch.ops.aten

#: Dtypes model code upcasts to on purpose (for norms, rotary angles, the loss).
_UPCAST = (torch.float32, torch.float64)

_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default)
#: Ops that only reshape, slice or copy their input.
_VIEWS = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
    aten.select.int, aten.transpose.int, aten.permute.default, aten.t.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default,
)
_FACTORIES = frozenset(
    op for op in (
        aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.rand, aten.randn,
        aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like,
        aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like,
    )
)
#: (activation, weight) argument positions of ops that need both in one dtype.
_WEIGHT_OPS = {
    aten.linear.default: (0, 1), aten.mm.default: (0, 1), aten.matmul.default: (0, 1),
    aten.addmm.default: (1, 2), aten.layer_norm.default: (0, 2),
}


class Tag(Enum):
    MODEL = "model"    # in the model's dtype: changes when the weights are cast
    CHOSEN = "chosen"  # in a dtype the code chose (an upcast, fp32 arithmetic)


def dtype_of(t: torch.Tensor) -> torch.dtype:
    return t.dtype


class FollowParamDtype(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        weights = {n: t for n in gm.graph.find_nodes(op="get_attr")
                   if isinstance(t := graph_attr(gm, n.target), torch.Tensor) and t.dtype.is_floating_point}
        totals = Counter()
        for t in weights.values():
            totals[t.dtype] += t.numel()
        if not totals:
            return PassResult(gm, False)
        rewrite = _Rewrite(gm.graph, totals.most_common(1)[0][0], weights)
        for node in list(gm.graph.nodes):
            rewrite.visit(node)
        return pass_result(gm, rewrite.modified)


class _Rewrite:
    def __init__(self, graph: fx.Graph, model_dtype: torch.dtype, weights: dict[fx.Node, torch.Tensor]) -> None:
        self.graph, self.model_dtype, self.weights = graph, model_dtype, weights
        self.anchors = [n for n, t in weights.items() if t.dtype == model_dtype]
        self.tags: dict[fx.Node, Tag | None] = {}
        self.upcasts: set[fx.Node] = set()
        self.modified = False

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            self.tags[node] = self._tag_of_dtype(self.weights.get(node, node.meta.get("val")))
        elif node.op != "call_function":
            self.tags[node] = self._promoted(node)
        elif node.target in _CASTS:
            self.tags[node] = self._cast(node)
        elif getattr(node.target, "overloadpacket", None) in _FACTORIES:
            self.tags[node] = self._factory(node)
        elif node.target is operator.getitem:
            self.tags[node] = self.tags.get(node.args[0])
        elif node.target == aten.type_as.default:
            self.tags[node] = self.tags.get(node.args[1])
        elif isinstance(node.kwargs.get("dtype"), torch.dtype):
            self.tags[node] = self._tag_of_dtype(node.meta.get("val")) and Tag.CHOSEN
        else:
            if node.target in _WEIGHT_OPS:
                self._match_weight(node, *_WEIGHT_OPS[node.target])
            self.tags[node] = self._promoted(node)

    def _tag_of_dtype(self, val: object) -> Tag | None:
        if isinstance(val, (tuple, list)):
            val = next((v for v in val if isinstance(v, torch.Tensor)), None)
        if not (isinstance(val, torch.Tensor) and val.dtype.is_floating_point):
            return None
        return Tag.MODEL if val.dtype == self.model_dtype else Tag.CHOSEN

    def _promoted(self, node: fx.Node) -> Tag | None:
        own = self._tag_of_dtype(node.meta.get("val"))
        if own is not Tag.MODEL:
            return own
        inputs = [self.tags.get(a) for a in node.all_input_nodes]
        return Tag.CHOSEN if Tag.CHOSEN in inputs else Tag.MODEL

    def _cast(self, node: fx.Node) -> Tag | None:
        x = node.args[0]
        key, target = _cast_dtype(node)
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not (isinstance(target, torch.dtype) and target.is_floating_point and isinstance(x_val, torch.Tensor)):
            return self._tag_of_dtype(node.meta.get("val"))
        implicit = node.target in (aten.to.dtype_layout, aten._to_copy.default) and "device" in node.kwargs
        if implicit and target == x_val.dtype:  # `x.to(device)`: export filled in x's dtype
            node.update_kwarg("dtype", None)
            self.modified = True
            return self.tags.get(x)
        if target != self.model_dtype:
            return Tag.CHOSEN
        if not x_val.dtype.is_floating_point or self.tags.get(x) is Tag.MODEL:
            keep = target in _UPCAST
        else:
            source = x
            while isinstance(source, fx.Node) and source.target in _VIEWS:
                source = source.args[0]
            keep = source in self.upcasts
        if not keep:
            self._follow(node, key)
            return Tag.MODEL
        self.upcasts.add(node)
        if x_val.dtype == target:
            self._unalias(node, x)
        return Tag.CHOSEN

    def _unalias(self, cast: fx.Node, x: fx.Node) -> None:
        """Give back `x` to the users of `cast` that used `x` in the model's code.

        A cast that changes nothing returns its input itself, and export binds the tensor to
        the cast from then on: the residual ``hidden_states`` after RMSNorm's
        ``hidden_states.to(torch.float32)``, or the returned ``logits`` after the loss's
        ``logits.float()``, read the upcast in the graph. Uses outside the module the cast ran
        in (and the graph's outputs) are taken to be such uses of the input.
        """
        path = owner(cast)[0]
        for user in list(cast.users):
            inside = user.op != "output" and (not path or f"{owner(user)[0]}.".startswith(f"{path}."))
            if not inside:
                user.replace_input_with(cast, x)
                self.modified = True

    def _factory(self, node: fx.Node) -> Tag | None:
        if node.kwargs.get("dtype") == self.model_dtype:
            self._follow(node, "dtype")
        return self._tag_of_dtype(node.meta.get("val"))

    def _match_weight(self, node: fx.Node, act: int, weight: int) -> None:
        x, w = node.args[act], node.args[weight] if len(node.args) > weight else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and self.tags.get(w) is Tag.MODEL):
            return
        if self.tags.get(x) is not Tag.CHOSEN:
            return
        with self.graph.inserting_before(node):
            dtype = self._dtype_node(node, w)
            cast = new_node(self.graph, node, "call_function", aten.to.dtype, (x, dtype))
        cast.meta["val"] = x.meta.get("val")
        node.update_arg(act, cast)
        self.tags[cast] = Tag.MODEL
        self.modified = True

    def _follow(self, node: fx.Node, key: int | str) -> None:
        anchor = closest_weight(node, self.anchors)
        with self.graph.inserting_before(node):
            dtype = self._dtype_node(node, anchor)
        if isinstance(key, int):
            node.update_arg(key, dtype)
        else:
            node.update_kwarg(key, dtype)
        self.modified = True

    def _dtype_node(self, user: fx.Node, anchor: fx.Node) -> fx.Node:
        dtype = new_node(self.graph, user, "call_function", dtype_of, (anchor,))
        dtype.meta["val"] = self.model_dtype
        return dtype


def _cast_dtype(node: fx.Node) -> tuple[int | str, object]:
    """(where the target dtype is passed, the dtype) of a cast node."""
    position = {aten.to.dtype: 1, aten.to.device: 2}.get(node.target)
    if position is not None and len(node.args) > position:
        return position, node.args[position]
    return "dtype", node.kwargs.get("dtype")
