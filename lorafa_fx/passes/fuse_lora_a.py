"""Pass (speed): one GEMM for an adapted linear's base product and its down-projection.

For each LoRA-FA adapter whose down-projection reads the base linear's own input (no
``lora_dropout``)::

    y = x W^T,  x A^T      ->      [y | x A^T] = x [W; A]^T,  split

so the b·s·d input is read once in forward and ``grad_x = [grad_y | grad_xa] [W; A]`` is one
GEMM in backward. ``A`` has r rows, W hundreds to thousands: the fused GEMM is the base GEMM
made r rows taller. This is `fuse_linears` restricted to the pair (W, A) of one adapter, with
its storage scheme: W and A become views of one new buffer (the user's parameters are
re-pointed, not copied, so the base weights stay stored once), and backward still keeps
only b·s·r values (``xa`` is ``scaling`` times the split part, a new tensor, or with
``scaling == 1`` a contiguous clone of it). `fuse_linears` subsumes this pass
(it also stacks q/k/v and their A's); run one of the two.

Reads ``node.meta["lorafa"]`` (roles ``"down"``/``"xa"``: the linear reading ``A``, and
``"out"``: its first operand is the base linear), ``["val"]``, ``["recompute"]``. Writes what
`fuse_linears` writes: ``meta["lorafa"] = {"role": "fused", "parts": [W, A targets]}`` on
the fused linear; the node standing for the replaced linear takes over its
``meta["lorafa"]`` and ``meta["recompute"]``.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.fx as fx

from ._graph import META_KEY
from .fuse_linears import FuseLinears, _is_frozen_linear

aten = torch.ops.aten


class FuseLoraA(FuseLinears):
    """Fuses each adapter's ``x W^T`` with its ``x A^T``."""

    def group_keys(self, gm: fx.GraphModule) -> dict[fx.Node, Hashable]:
        keys: dict[fx.Node, Hashable] = {}
        for node in gm.graph.nodes:
            info = node.meta.get(META_KEY, {})
            if info.get("role") == "out":
                base = node.args[0]
                if isinstance(base, fx.Node) and base.target == aten.linear.default:
                    keys[base] = (base.args[0], info["adapter"])
            elif info.get("role") in ("down", "xa") and node.target == aten.linear.default:
                keys[node] = (node.args[0], info["adapter"])
        return {n: k for n, k in keys.items() if _is_frozen_linear(gm, n)}
