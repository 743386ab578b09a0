"""stages.py: the pass lists run in an order that `stages.ORDER` allows, and a list in the wrong
order is refused before any pass runs (reference: the graph left unchanged)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from lorafa_fx import stages
from lorafa_fx.passes.drop_metadata_asserts import DropMetadataAsserts
from lorafa_fx.passes.follow_param_dtype import FollowParamDtype
from lorafa_fx.passes.lean_norms import LeanNorms


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Linear(2, 2))


def test_the_default_lists_satisfy_the_order():
    """Every (earlier, later) pair of ORDER holds in the lists the pipeline runs."""
    passes = [*stages.graph_passes(torch.nn.Module()), *stages.LEAN_PASSES, *stages.adapter_passes([], None)]
    ranks = {type(p): i for i, p in enumerate(passes)}
    for constraint in stages.ORDER:
        for a in passes:
            for b in passes:
                if ranks[type(a)] < ranks[type(b)]:
                    assert constraint(a, b), f"{type(a).__name__} runs before {type(b).__name__} against ORDER"


def test_a_list_in_the_wrong_order_is_refused_before_any_pass_runs():
    gm = _graph()
    code = gm.code
    with pytest.raises(RuntimeError, match="pass schedule constraint violated"):
        stages.run(gm, [LeanNorms(), FollowParamDtype()])
    with pytest.raises(RuntimeError, match="pass schedule constraint violated"):
        stages.run(gm, [FollowParamDtype(), DropMetadataAsserts()])
    assert gm.code == code
