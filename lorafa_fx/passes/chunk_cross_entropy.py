"""Pass (memory): the output projection and the cross-entropy loss, a chunk of tokens at a time.

A causal LM ends with ``logits = h W^T`` (b·s·V values, upcast to fp32) and
``loss = cross_entropy(logits, labels)``; autograd keeps the log-softmax (b·s·V) for backward,
and backward materialises two more b·s·V gradients. With a 128k vocabulary at batch 16 x
1024 tokens the fp32 logits alone are 8.4 GB. This pass replaces that tail with a fused
linear-cross-entropy (the scheme of Liger-Kernel's ``FusedLinearCrossEntropy``): the rows of
``h`` are taken ``chunk`` at a time; for each chunk the fp32 logits are computed and
exponentiated in place (their log-sum-exp gives the chunk's loss; the same buffer then becomes
the softmax), and the gradient is formed right away::

    grad_logits = (softmax(logits) - (1 - eps) onehot(label) - eps / V) * valid / n_valid
    grad_h[chunk] = grad_logits W          grad_W += grad_logits^T h[chunk]   (if W trains)

``eps`` is the label smoothing, ``n_valid`` the number of labels that are not
``ignore_index`` (``reduction="mean"``; 1 for ``"sum"``). Forward keeps ``grad_h``
(b·s·d, the size of ``h``) for backward, which scales it by the incoming gradient; one
chunk x V buffer is live at a time and no b·s·V tensor exists. Chunk size: ``max(ceil(N·d / V), ceil(4 MiB / (V·4)))`` rows,
so a chunk's fp32 logits are no bigger than ``h`` (N·d values) unless that is under 4 MiB
(then a few rows, so a GEMM still has rows to work with); ``chunk_size`` overrides it.

**Logits.** The model's output still has its ``logits`` field, but in train mode
(``gm.train()``) it is ``None``: returning it would materialise what the pass avoids. In eval
mode (``gm.eval()``) the logits are computed in full and returned as before (the loss is still
computed chunk by chunk). For that reason it runs only when ``LoraFAConfig.chunked_cross_entropy``
is True, or (None, the default) when the planner needs it to meet a budget, with a warning.

Matches ``aten.cross_entropy_loss(view(linear(h, W, b) [-> to(dtype)]), target)`` with
``W`` (and ``b``) a ``get_attr``, no class ``weight`` and reduction ``mean`` or ``sum``; the
logits may also feed the graph output. A LoRA-adapted output projection (``lm_head`` in
``target_modules``) or logits used elsewhere leave the graph unchanged.

Reads ``node.meta["val"]``. Writes ``meta.ROLE`` = "chunked_ce" on the
loss node and "eval_logits" on the logits node (a call to an `EvalLogits`
submodule ``<lm_head path>.eval_logits``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..graph import add_submodule, new_node, owner, pass_result
from ..ops.cross_entropy import EvalLogits, linear_cross_entropy

aten = torch.ops.aten

#: Ops between the output projection and the loss that only reshape or cast the logits.
_FLATTEN_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CAST_OPS = (aten.to.dtype, aten._to_copy.default)


_REDUCTIONS = {1: "mean", 2: "sum"}


class ChunkCrossEntropy(PassBase):
    """Replaces ``cross_entropy(linear(h, W))`` with `linear_cross_entropy` (see module doc)."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive number of rows, or None for the default.")
        self.chunk_size = chunk_size

    @staticmethod
    def applies(gm: fx.GraphModule) -> bool:
        """Whether `gm` ends in a loss this pass rewrites."""
        return any(_match(ce) for ce in gm.graph.find_nodes(op="call_function", target=aten.cross_entropy_loss.default))

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for ce in list(graph.find_nodes(op="call_function", target=aten.cross_entropy_loss.default)):
            match = _match(ce)
            if match is None:
                continue
            linear, cast, flatten, exposed = match
            h, weight = linear.args[:2]
            bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
            target = ce.args[1]
            _, reduction, ignore_index, smoothing = _ce_options(ce)
            dtype = cast.meta["val"].dtype if cast is not None else None
            with graph.inserting_before(ce):
                loss = new_node(graph, ce, "call_function", linear_cross_entropy, (h, weight, bias, target), {
                    "ignore_index": ignore_index, "label_smoothing": smoothing, "reduction": _REDUCTIONS[reduction],
                    "dtype": dtype, "chunk_size": self.chunk_size,
                })
            loss.meta["val"] = ce.meta.get("val")
            meta.annotate(loss, role="chunked_ce")
            ce.replace_all_uses_with(loss)
            if exposed is not None:
                path, _ = owner(linear)
                target_name = add_submodule(gm, path, "eval_logits", EvalLogits(dtype))
                with graph.inserting_before(ce):
                    logits = new_node(graph, exposed, "call_module", target_name, (h, weight, bias))
                logits.meta["val"] = exposed.meta.get("val")
                meta.annotate(logits, role="eval_logits")
                exposed.replace_all_uses_with(logits, delete_user_cb=lambda user: user.op == "output")
            for node in (ce, flatten, cast, linear):
                if node is not None:
                    for user in list(node.users):
                        if user.target == aten._assert_tensor_metadata.default:
                            graph.erase_node(user)
                    if not node.users:
                        graph.erase_node(node)
            modified = True
        return pass_result(gm, modified, drop_unused=True)


def _ce_options(ce: fx.Node) -> tuple:
    """(weight, reduction, ignore_index, label_smoothing) of an ``aten.cross_entropy_loss`` node."""
    names, defaults = ("weight", "reduction", "ignore_index", "label_smoothing"), (None, 1, -100, 0.0)
    return tuple(ce.args[i + 2] if len(ce.args) > i + 2 else ce.kwargs.get(name, default)
                 for i, (name, default) in enumerate(zip(names, defaults)))


def _match(ce: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node, fx.Node | None] | None:
    """(linear, cast or None, flatten, node returned as logits or None), or None if no match."""
    weight, reduction, _, _ = _ce_options(ce)
    if weight is not None or reduction not in _REDUCTIONS:
        return None
    flatten = ce.args[0]
    if not (isinstance(flatten, fx.Node) and flatten.target in _FLATTEN_OPS):
        return None
    node, cast = flatten.args[0], None
    if isinstance(node, fx.Node) and node.target in _CAST_OPS:
        if node.target == aten._to_copy.default and set(node.kwargs) - {"dtype"}:
            return None
        node, cast = node.args[0], node
    linear = node
    if not (isinstance(linear, fx.Node) and linear.target == aten.linear.default):
        return None
    params = [a for a in linear.args[1:] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return None
    # Every use of the chain must be the chain itself, the loss, a metadata assert or the output.
    chain = [n for n in (linear, cast, flatten) if n is not None]
    exposed = None
    for node in chain:
        for user in node.users:
            if user in chain or user is ce or user.target == aten._assert_tensor_metadata.default:
                continue
            if user.op == "output" and node is not flatten and exposed in (None, node):
                exposed = node
                continue
            return None
    return linear, cast, flatten, exposed


