"""The pipeline's stages as data: which passes run, in which order, and why that order.

    capture (capture.py)
      -> GRAPH_PASSES: clean-ups that make the captured graph the model's, whatever dtype,
         device and autocast it later runs in          once per capture (`captured_model.py`)
      -> LEAN_PASSES: exact rewrites that keep less for backward than eager PyTorch
      -> adapter_passes(): the LoRA-FA branch, and what it saves   once per planner rung
      -> ChunkCrossEntropy, ExpandLayers (a shallow capture grown to depth)
      -> REALISE: the planner's block decisions, each layer outlined for FSDP2  (pipeline.py)

Each stage is a list of `PassBase` instances run by torch's `PassManager`; `ORDER` holds the
constraints between passes (torch's ``this_before_that_pass_constraint``, over pass classes), and
`run` checks them before anything runs, so a list built in the wrong order fails at once instead
of producing a subtly different graph. The captured-model object takes the lists as arguments,
so a test runs the pipeline without the lean passes by passing ``lean_passes=()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

from .choices import Decision
from .config import LoraFAConfig
from .errors import LoraFAError
from .passes.annotate_saved_tensors import AnnotateSavedTensors
from .passes.compact_saved_views import CompactSavedViews
from .passes.drop_full_slices import DropFullSlices
from .passes.drop_metadata_asserts import DropMetadataAsserts
from .passes.follow_input_device import FollowInputDevice
from .passes.follow_param_dtype import FollowParamDtype
from .passes.gate_dropout import GateDropout
from .passes.lean_experts import LeanExperts
from .passes.lean_gated_mlp import LeanGatedMLP
from .passes.lean_norms import LeanNorms
from .passes.lean_pointwise import LeanPointwise
from .passes.outline_layers import OutlineLayers
from .passes.recognize_linears import RecognizeLinears
from .passes.recompute_regions import RecomputeRegions
from .passes.rewrite_lora_fa import RewriteLoraFA
from .passes.simplify_attention import SimplifyAttention
from .targets import Adapter

Pass = Callable[[fx.GraphModule], object]


def graph_passes(model: nn.Module) -> list[PassBase]:
    """The clean-ups of a capture of `model` (`SimplifyAttention` needs to know which of its
    attention modules are causal)."""
    causal = frozenset(path for path, m in model.named_modules() if getattr(m, "is_causal", False) is True)
    return [DropMetadataAsserts(), FollowInputDevice(), FollowParamDtype(), DropFullSlices(), RecognizeLinears(),
            GateDropout(), SimplifyAttention(causal)]


#: Exact rewrites that keep less for backward than eager PyTorch keeps: free memory, applied
#: to every model before anything is planned.
LEAN_PASSES: tuple[PassBase, ...] = (LeanNorms(), LeanGatedMLP(), LeanPointwise(), CompactSavedViews(), LeanExperts())


def adapter_passes(adapters: Sequence[Adapter], config: LoraFAConfig) -> list[PassBase]:
    """The LoRA-FA branch on each of `adapters`, and the pin on what it saves for backward."""
    return [RewriteLoraFA(adapters, config), AnnotateSavedTensors()]


def _before(this: type, that: type) -> Callable[[object, object], bool]:
    """torch's ``this_before_that_pass_constraint`` over pass classes (the lists hold instances)."""
    return lambda a, b: not (isinstance(a, that) and isinstance(b, this))


#: (earlier, later) pairs, with the reason each is needed.
ORDER = (
    # Export's dtype/device asserts name the capture's dtype and device: gone before those are followed.
    _before(DropMetadataAsserts, FollowInputDevice),
    _before(DropMetadataAsserts, FollowParamDtype),
    # The lean rewrites match the casts as `follow_param_dtype` leaves them (``dtype_of(w)`` nodes).
    _before(FollowParamDtype, LeanNorms),
    _before(FollowParamDtype, LeanGatedMLP),
    _before(FollowParamDtype, LeanPointwise),
    # Matmuls with a transposed weight become linears before anything looks for linears.
    _before(RecognizeLinears, RewriteLoraFA),
    # The experts' adapters go on the lean experts op, which takes the place of transformers' grouped matmul.
    _before(LeanExperts, RewriteLoraFA),
    # compact_saved_views decides from what the graph keeps once every other lean rewrite is in.
    _before(LeanNorms, CompactSavedViews),
    _before(LeanGatedMLP, CompactSavedViews),
    _before(LeanPointwise, CompactSavedViews),
    # The saved-tensor pin is on the nodes the rewrite adds.
    _before(RewriteLoraFA, AnnotateSavedTensors),
    # FSDP2's layers take a block's recompute region inside them.
    _before(RecomputeRegions, OutlineLayers),
)


def run(gm: fx.GraphModule, passes: Sequence[Pass]) -> fx.GraphModule:
    """`passes` run in order on `gm` by torch's `PassManager`, after checking `ORDER`."""
    if not passes:
        return gm
    manager = PassManager(list(passes), list(ORDER))
    manager.validate_constraints()  # refuses a wrong order instead of re-sorting it
    try:
        return manager(gm).graph_module
    except Exception as e:
        # PassManager wraps what a pass raises; the library's own errors are the user's to read.
        if isinstance(e.__cause__, LoraFAError):
            raise e.__cause__ from None
        raise


class _Realise:
    """The rewrites a simulator prices the planner's decisions with (`memory.simulate.Realise`)."""

    def regions(self, gm: fx.GraphModule, decisions: Mapping[str, Decision]) -> fx.GraphModule:
        return run(gm, [RecomputeRegions(decisions)])

    def layers(self, gm: fx.GraphModule) -> fx.GraphModule:
        return run(gm, [OutlineLayers()])


REALISE = _Realise()
