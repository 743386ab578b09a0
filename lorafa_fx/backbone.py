"""A causal LM's backbone inside the GraphModule: the captured graph up to the output projection.

TRL's ``SFTTrainer`` (1.x) does not run the model's own head and loss: it patches
``model.forward`` with a fused LM head (``trl.trainer.utils.add_fused_lm_head``) that calls
``model.base_model(**batch, use_cache=False).last_hidden_state``, reads
``model.get_output_embeddings()``'s ``.weight`` and ``.bias`` and computes the log-probabilities
of the labels itself, a chunk of tokens at a time. `causal_lm_backbone` gives the GraphModule
both:

- `Backbone`: the same captured graph, cut at the hidden state ``h`` the output projection
  reads (``linear(h, W[, b])``, or the chunked loss's ``linear_cross_entropy(h, W, b, ...)``),
  so the LoRA-FA adapters, dropout gates and recomputed blocks are the GraphModule's own. Its
  code is generated once and runs with the GraphModule as ``self``: every parameter, buffer
  and submodule is looked up on the GraphModule at each call, so ``gm.to(...)`` and
  ``load_adapter`` reach it and nothing is copied.
- `Backbone.output_embeddings`: the projection's ``W`` and ``b``, the GraphModule's tensors.

Only for decoder-only models whose output embedding is a projection of a (batch, sequence,
hidden) state; `causal_lm_backbone` returns None for the others.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from .errors import LoraFAError
from .graph import attribute

#: Keywords a transformers backbone takes whose values here change nothing: no KV cache, no
#: attentions or intermediate hidden states are returned, and the output is always an object.
_NO_EFFECT = {
    "use_cache": (None, False), "output_attentions": (None, False), "output_hidden_states": (None, False),
    "return_dict": (None, True),
}


class OutputProjection(nn.Module):
    """The output embedding as TRL reads it: ``weight`` and ``bias`` (or None), the GraphModule's tensors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias


class Backbone(nn.Module):
    """``backbone(**batch)``: ``BaseModelOutputWithPast(last_hidden_state=h)``, `root`'s graph up to ``h``.

    `root` is the GraphModule itself (a child here, so ``backbone.parameters()`` are its
    parameters); the GraphModule holds the backbone outside its own submodules, so its
    ``state_dict`` and ``modules()`` are unchanged.
    """

    def __init__(self, root: fx.GraphModule, code, inputs: list[str], weight: str, bias: str | None,
                 head_adapted: bool) -> None:
        super().__init__()
        self.root = root
        self._code, self._inputs = code, inputs
        self._weight, self._bias, self._head_adapted = weight, bias, head_adapted

    def forward(self, **batch) -> BaseModelOutputWithPast:
        problems = [f"{k} (an input the graph was not captured with)" for k in batch
                    if k not in self._inputs and k not in _NO_EFFECT]
        problems += [f"{k}={batch[k]!r} (only {' or '.join(map(repr, ok))} can be followed)"
                     for k, ok in _NO_EFFECT.items() if k in batch and batch[k] not in ok]
        problems += [f"{k} (missing)" for k in self._inputs if batch.get(k) is None]
        if problems:
            raise LoraFAError(
                f"The lorafa_fx backbone runs the captured graph up to the last hidden state and takes "
                f"{', '.join(self._inputs)}; it cannot honour {', '.join(problems)}. Transform the model with "
                "example_inputs holding the keys of the training batches (a padding-free collator passes "
                "position_ids and no attention_mask)."
            )
        return BaseModelOutputWithPast(last_hidden_state=self._code(self.root, **{k: batch[k] for k in self._inputs}))

    def output_embeddings(self) -> OutputProjection:
        """What ``gm.get_output_embeddings()`` returns: the output projection's ``W``/``b`` as ``gm`` holds them now."""
        if self._head_adapted:
            raise LoraFAError(
                "The output projection carries a LoRA-FA adapter, but TRL's fused LM head multiplies the hidden "
                "states by its weight alone, so the adapter would be ignored and never trained. Remove the output "
                "projection (e.g. 'lm_head') from target_modules, or list it in modules_to_save to train it in full."
            )
        return OutputProjection(attribute(self.root, self._weight), attribute(self.root, self._bias) if self._bias else None)


def causal_lm_backbone(gm: fx.GraphModule, model: nn.Module) -> Backbone | None:
    """`gm`'s graph cut at the hidden state `model`'s output embedding projects, or None if `gm` has no such state."""
    if not isinstance(model, PreTrainedModel) or model.config.is_encoder_decoder:
        return None
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    head_path = next(name for name, m in model.named_modules() if m is head)
    weight = _gm_output_weight(gm, head_path, head.weight)
    if weight is None:
        return None
    projections = [user for node in gm.graph.find_nodes(op="get_attr") if attribute(gm, node.target) is weight
                   for user in node.users if len(user.args) > 1 and user.args[1] is node]
    hidden = {p.args[0] for p in projections}
    if len(hidden) != 1:
        return None
    (h,) = hidden
    val = h.meta.get("val")
    # TRL drops the last position with `last_hidden_state[:, :-1]`: a flattened h would lose a hidden unit instead.
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        return None
    bias = projections[0].args[2] if len(projections[0].args) > 2 else None
    graph = _cut_at(gm, h, getattr(model, "main_input_name", "input_ids"))
    if graph is None:
        return None
    inputs = [n.target for n in graph.find_nodes(op="placeholder")]
    head_adapted = any(a.path == head_path for a in gm.lorafa.adapters)
    # Only the generated function is kept, called with gm as `self`: a GraphModule of its own would hold its own
    # containers of gm's tensors, and gm.to(...) replaces buffers in gm's containers only.
    return Backbone(gm, type(fx.GraphModule(gm, graph)).forward, inputs, projections[0].args[1].target,
                    bias.target if isinstance(bias, fx.Node) else None, head_adapted)


def _gm_output_weight(gm: fx.GraphModule, head_path: str, model_weight: torch.Tensor) -> torch.Tensor | None:
    """The output weight as `gm` holds it: under the head's path (a modules_to_save copy included), else the
    model's own tensor under the name export kept for tied weights (GPT-2's lm_head/wte)."""
    try:
        return gm.get_parameter(f"{head_path}.weight")
    except AttributeError:
        return model_weight if any(p is model_weight for p in gm.parameters()) else None


def _cut_at(gm: fx.GraphModule, h: fx.Node, main_input: str) -> fx.Graph | None:
    """A copy of `gm`'s graph that returns `h`; placeholders only the loss read (labels) are dropped."""
    # Owned by gm so dead-code elimination can ask gm's submodules whether they are impure.
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, env)
    graph.output(env[h])
    graph.eliminate_dead_code()
    placeholders = {n.target: n for n in graph.find_nodes(op="placeholder")}
    loss_only = [n for n in placeholders.values() if n.users and all(u.target == "_guards_fn" for u in n.users)]
    if loss_only:
        if main_input not in placeholders:
            return None
        # Export's input checks (`_guards_fn`) also take the labels. In next-token training they have the
        # main input's shape, so checking that input in their place keeps every shape check but needs no labels.
        for node in loss_only:
            for user in list(node.users):
                user.replace_input_with(node, placeholders[main_input])
    for node in placeholders.values():
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    return graph

