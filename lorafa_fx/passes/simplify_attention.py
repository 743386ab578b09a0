"""Pass: give captured attention the eager model's memory footprint.

Under export, transformers takes code paths it avoids in eager mode: it materialises the
causal mask even when no token is padded, and it expands grouped k/v heads to the query
heads (``repeat_kv``) before SDPA. Both are saved for backward: the expanded k/v
(``n_rep`` x the k/v bytes) and, per layer, a float copy of the mask (b·s² values).

This pass replaces each ``aten.scaled_dot_product_attention`` node with a call to an
`SDPAttention` submodule that

* takes k/v before ``repeat_kv`` and runs SDPA with ``enable_gqa=True`` (same math);
* drops the mask at run time when it is all-true, or exactly causal over a square score
  matrix, and uses ``is_causal=True`` instead, as eager transformers does. The check runs
  once per mask tensor (`elide_mask` nodes are shared by all layers) and only eagerly:
  under `torch.compile` the mask is kept, like compiled transformers keeps it. On fake
  tensors (the cost model) data cannot be read: inside `assume_unpadded()` the mask is
  dropped as the attention module's kind says (``is_causal`` attribute: causal, else full);
* applies SDPA's ``dropout_p`` only in train mode;
* for a mask that puts an additive position bias (T5's ``(1, h, q, k)``) under a boolean mask
  (``torch.where(mask, bias, min)``, transformers' ``create_position_bias_mask``), drops the
  boolean mask the same way before the ``where`` (`position_bias_mask`): eager transformers
  gives SDPA the bias at its own size when no token is padded, where the captured graph would
  broadcast it to every row of the batch (b x the bytes; kept for backward by the fused kernels).

Reads ``node.meta["nn_module_stack"]`` and ``["val"]``; the new nodes inherit them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import add_submodule, new_node, owner, pass_result
from ..ops.attention import SDPAttention, elide_mask, position_bias_mask
from .drop_full_slices import is_full_slice

aten = torch.ops.aten


class SimplifyAttention(PassBase):
    """`causal_modules`: paths of the model's attention modules whose ``is_causal`` is true."""

    def __init__(self, causal_modules: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.causal_modules = causal_modules

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        elided: dict[tuple, tuple[fx.Node, fx.Node]] = {}
        nodes = list(graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default))
        for node in nodes:
            q, k, v, mask, dropout_p, is_causal = _sdpa_args(node)
            kk, vv = _repeat_kv_source(k), _repeat_kv_source(v)
            gqa = node.kwargs.get("enable_gqa", False)
            if kk is not None and vv is not None and kk[1] == vv[1]:
                k, v, gqa = kk[0], vv[0], True
            path, _ = owner(node)
            causal_module = path in self.causal_modules
            where = _position_bias_where(mask)
            if where is not None:
                cond, bias, fill = where.args
                with graph.inserting_before(where):
                    call = new_node(graph, where, "call_function", position_bias_mask,
                                    (*_elided(graph, elided, cond, False, causal_module), bias, fill))
                call.meta["val"] = where.meta.get("val")
                where.replace_all_uses_with(call)
                graph.erase_node(where)
                mask = call if mask is where else mask
            if isinstance(mask, fx.Node):
                mask, is_causal = _elided(graph, elided, mask, is_causal, causal_module)
            target = add_submodule(gm, path, "sdpa", SDPAttention(dropout_p, node.kwargs.get("scale"), gqa))
            with graph.inserting_before(node):
                attn = new_node(graph, node, "call_module", target, (q, k, v, mask, is_causal))
            attn.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(attn)
            graph.erase_node(node)
        return pass_result(gm, bool(nodes), drop_unused=True)


def _elided(graph: fx.Graph, elided: dict[tuple, tuple[fx.Node, fx.Node]], mask: fx.Node, is_causal: bool,
            causal_module: bool) -> tuple[fx.Node, fx.Node]:
    """The (mask, is_causal) nodes of ``elide_mask(mask, ...)``, made once per mask and kind."""
    key = (mask, is_causal, causal_module)
    if key not in elided:
        with graph.inserting_after(mask):
            pair = new_node(graph, mask, "call_function", elide_mask, (mask, is_causal, causal_module))
        with graph.inserting_after(pair):
            elided[key] = (
                new_node(graph, mask, "call_function", operator.getitem, (pair, 0)),
                new_node(graph, mask, "call_function", operator.getitem, (pair, 1)),
            )
        elided[key][0].meta["val"] = mask.meta.get("val")
    return elided[key]


def _position_bias_where(mask: object) -> fx.Node | None:
    """The ``where(bool mask, bias, fill)`` making SDPA's `mask` (under a ``contiguous``) when the
    bias has one row and the result one per batch row; else None."""
    if isinstance(mask, fx.Node) and mask.target == aten.contiguous.default:
        mask = mask.args[0]
    if not (isinstance(mask, fx.Node) and mask.target in (aten.where.ScalarOther, aten.where.self)):
        return None
    cond, bias = mask.args[:2]
    vals = [getattr(n, "meta", {}).get("val") for n in (mask, cond, bias)]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals) or vals[1].dtype != torch.bool:
        return None
    one_row, batch_rows = statically_known_true(vals[2].shape[0] == 1), not statically_known_true(vals[0].shape[0] == 1)
    return mask if one_row and batch_rows else None


def _sdpa_args(node: fx.Node) -> tuple:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    defaults = (None, None, None, None, 0.0, False)
    return tuple(
        node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults))
    )


def _repeat_kv_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, n_rep)`` if `node` is transformers' ``repeat_kv(x, n_rep)``, else None.

    repeat_kv is ``x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)``.
    """
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default and len(expand.args[1]) == 5):
        return None
    n_rep = expand.args[1][2]
    src = expand.args[0]
    while isinstance(src, fx.Node) and is_full_slice(src):
        src = src.args[0]
    if not (isinstance(src, fx.Node) and src.target == aten.unsqueeze.default and src.args[1] == 2):
        return None
    src = src.args[0]
    while isinstance(src, fx.Node) and is_full_slice(src):
        src = src.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(n_rep, int) or not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    return src, n_rep
