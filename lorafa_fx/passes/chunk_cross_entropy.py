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

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ._graph import add_submodule, new_node, owner, pass_result

aten = torch.ops.aten

#: Ops between the output projection and the loss that only reshape or cast the logits.
_FLATTEN_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CAST_OPS = (aten.to.dtype, aten._to_copy.default)

#: Smallest chunk of fp32 logits worth a GEMM call (bytes).
MIN_CHUNK_BYTES = 4 * 2**20

_REDUCTIONS = {1: "mean", 2: "sum"}


class EvalLogits(torch.nn.Module):
    """``linear(h, W, b).to(dtype)`` in eval mode; ``None`` in train mode (never materialised)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training:
            return None
        logits = F.linear(h, weight, bias)
        return logits if self.dtype is None else logits.to(self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


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


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    dtype: torch.dtype | None = None, chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).to(dtype).flatten(0, -2), target, ...)``, chunked.

    Never holds more than one chunk of logits; see the module docstring for the formulas.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(
        h, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, chunk_size, needs_grad
    )


def _chunk_rows(n: int, d: int, vocab: int, itemsize: int) -> int:
    return max(math.ceil(n * d / vocab), math.ceil(MIN_CHUNK_BYTES / (vocab * itemsize)), 1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, chunk_size, needs_grad):
        h2 = h.reshape(-1, h.shape[-1])
        target = target.reshape(-1)
        dtype = dtype or torch.promote_types(h.dtype, weight.dtype)
        n, vocab = h2.shape[0], weight.shape[0]
        rows = chunk_size or _chunk_rows(n, h2.shape[1], vocab, torch.finfo(dtype).bits // 8)
        valid = target != ignore_index
        denom = valid.sum().to(dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=h.device)
        want_h, want_w, want_b = (needs_grad and t is not None and t.requires_grad for t in (h, weight, bias))
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(h2) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        for start in range(0, n, rows):
            hc, tc, vc = h2[start:start + rows], target[start:start + rows], valid[start:start + rows]
            logits = F.linear(hc, weight, bias).to(dtype)
            safe = torch.where(vc, tc, 0).unsqueeze(1)
            row_loss = -logits.gather(1, safe).squeeze(1)
            if label_smoothing:
                row_loss = (1 - label_smoothing) * row_loss - label_smoothing * logits.mean(dim=-1)
            # log-sum-exp with the exponentials kept, in place: they become the softmax below
            top = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(top).exp_()
            norm = g.sum(dim=-1)
            row_loss += norm.log() + top.squeeze(1)
            total += torch.where(vc, row_loss, 0).sum()
            if not (want_h or want_w or want_b):
                continue
            g.div_(norm.unsqueeze(1))
            g.scatter_add_(1, safe, torch.full_like(safe, label_smoothing - 1, dtype=g.dtype))
            if label_smoothing:
                g.sub_(label_smoothing / vocab)
            g.mul_((vc.to(g.dtype) / denom).unsqueeze(1))
            g = g.to(weight.dtype)
            if want_h:
                torch.mm(g, weight, out=grad_h[start:start + rows])
            if want_w:
                grad_w.addmm_(g.t().to(acc), hc.to(acc))
            if want_b:
                grad_b += g.sum(0, dtype=acc)
        ctx.h_shape = h.shape
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.wants = (want_h, want_w, want_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        want_h, want_w, want_b = ctx.wants
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_h = next(saved).mul(grad_loss).to(h_dtype).view(ctx.h_shape) if want_h else None
        grad_w = next(saved).mul(grad_loss).to(w_dtype) if want_w else None
        grad_b = next(saved).mul(grad_loss).to(b_dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None
