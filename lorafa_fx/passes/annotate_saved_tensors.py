"""Pass: pin LoRA-FA's saved-tensor decision so `torch.compile` keeps it.

In eager mode autograd already saves ``xa`` and not ``x`` for an adapted linear (``A`` and
``W`` are frozen, so no formula needs ``x``). AOTAutograd's min-cut partitioner decides
afresh what to save; this pass tags each ``xa`` node with torch's own
``meta["recompute"] = CheckpointPolicy.MUST_SAVE``, which the partitioner honours
(`torch/_functorch/partitioners.py`: ``should_ban_recomputation``), so it cannot choose to
rematerialise ``xa`` from the b·s·d input instead.

Reads ``meta.ROLE``; writes torch's ``node.meta["recompute"]``.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.checkpoint import CheckpointPolicy

from .. import meta


class AnnotateSavedTensors(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if meta.lorafa_meta(node).get(meta.ROLE) == "xa":
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                modified = True
        return PassResult(gm, modified)
