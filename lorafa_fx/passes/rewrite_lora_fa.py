"""Pass: turn each targeted linear into its LoRA-FA form.

For every adapter, the linear node whose weight is ``get_attr(f"{path}.weight")`` —
``aten.linear(x, W, b)`` for `nn.Linear`, ``aten.addmm(b, x, W)`` for GPT-2's `Conv1D`,
``lorafa_fx.matmul_4bit/8bit(x, W, ...)`` for bitsandbytes' layers (`bnb_layers`) —
gets the low-rank branch of the paper's eq. (1)::

    y = x W^T + scaling * (x A^T) B^T  =  x W^T + xa B^T,   xa = scaling * x A^T  (b·s·r values)

with ``A = {path}.lora_A.weight`` (shape ``(r, in)``, frozen, random init from
``config.seed``) and ``B = {path}.lora_B.weight`` (shape ``(out, r)``, zeros, trained), in
``W``'s dtype, or for a quantised ``W`` in the dtype the layer computes in (its output's).
The ops are PEFT's ``lora.Linear.forward`` (``lora_B(lora_A(dropout(x))) * scaling`` added
to the base output) with one change of order: ``scaling`` multiplies ``x A^T`` (b·s·r
values) instead of ``(x A^T) B^T`` (b·s·out), the same product at r/out of the elementwise
work in forward and in backward (where ``grad * scaling`` moves to the b·s·r side too).
With ``scaling`` a power of two (``lora_alpha / r`` for powers of two, 1 by default) the
numbers are PEFT's bit for bit, else they differ by rounding (an ulp); with ``scaling == 1``
there is no multiplication.

Because ``A`` does not require grad, autograd needs only ``xa = scaling * x A^T`` (not
``x``) to compute ``grad_B = grad_y^T xa``; `annotate_saved_tensors` pins that choice for
`torch.compile`'s partitioner.

An adapted parameter (`targets`' ``target_parameters``) run by a linear op (an MoE router's
``weight``) is rewritten the same way. An experts' 3-D parameter, run by the grouped matmul
``expert_linear(x, w, offs)`` (`lean_experts`), becomes ``expert_linear(x, w, offs, xa, lora_B)``
with ``xa = expert_xa(x, offs, lora_A, scaling)``: the same branch per expert (`ops/experts.py`),
``lora_A``/``lora_B`` of shapes ``(E·r, in)``/``(out, E·r)`` (PEFT's ``ParamWrapper``).

Writes ``meta.ADAPTER`` (the adapter's path) and ``meta.ROLE`` on every node it creates,
ROLE one of ``"lora_A"``, ``"lora_B"``, ``"dropout"``, ``"down"`` (``x A^T``, absent when
``scaling == 1``), ``"xa"`` (``scaling * x A^T``, the tensor backward keeps), ``"xab"``
(``xa B^T``), ``"out"`` (the base output plus ``xab``, or an experts' adapted matmul); new nodes inherit
``nn_module_stack``/``stack_trace`` and get ``meta["val"]``. Reads ``node.meta["val"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..config import LoraFAConfig
from ..graph import get_attr, new_node, pass_result, replace_node, set_fake_val
from ..ops.bnb import QUANTIZED_LINEAR_OPS
from ..ops.experts import expert_linear, expert_xa
from ..targets import Adapter
from .lean_experts import expert_operands, expert_weight

aten = torch.ops.aten

#: Linear ops and the index of their input and weight operands; bitsandbytes layers are
#: captured as `bnb_layers`' ops, their weight a get_attr as for `aten.linear`.
LINEAR_OPS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2), **QUANTIZED_LINEAR_OPS}


def weight_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The op nodes that multiply by each weight, by the weight's name (one module may be
    called twice): linear ops (`LINEAR_OPS`) by their ``{path}.weight``, experts' grouped
    matmuls (`lean_experts.expert_weight`) by their 3-D parameter."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS:
            weight = node.args[LINEAR_OPS[node.target][1]]
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
                found.setdefault(weight.target, []).append(node)
        elif (name := expert_weight(node)) is not None:
            found.setdefault(name, []).append(node)
    return found


class RewriteLoraFA(PassBase):
    """Adds the LoRA-FA branch to the weights of `adapters` (each must be in `weight_nodes`)."""

    def __init__(self, adapters: Sequence[Adapter], config: LoraFAConfig) -> None:
        super().__init__()
        self.adapters = {a.path: a for a in adapters}
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        generator = torch.Generator().manual_seed(self.config.seed)
        nodes = weight_nodes(gm)
        for adapter in self.adapters.values():
            weight = gm.get_parameter(adapter.weight)
            users = nodes[adapter.weight]
            _add_adapter_params(gm, adapter, weight, _compute_dtype(weight, users[0]), self.config, generator)
            for node in users:
                if expert_weight(node) is None:
                    self._rewrite(gm, node, adapter)
                else:
                    _rewrite_experts(gm, node, adapter)
        return pass_result(gm, bool(self.adapters))

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, adapter: Adapter) -> None:
        graph, path = gm.graph, adapter.path
        x = node.args[LINEAR_OPS[node.target][0]]

        def emit(role: str, op: str, target, args: tuple, fake=None) -> fx.Node:
            n = new_node(graph, node, op, target, args)
            meta.annotate(n, adapter=path, role=role)
            if fake is not None:
                set_fake_val(n, fake, gm)
            return n

        with graph.inserting_before(node.next):
            lora_A = get_attr(gm, node, f"{path}.lora_A.weight")
            lora_B = get_attr(gm, node, f"{path}.lora_B.weight")
            meta.annotate(lora_A, adapter=path, role="lora_A")
            meta.annotate(lora_B, adapter=path, role="lora_B")
            if self.config.lora_dropout:
                x = emit("dropout", "call_module", f"{path}.lora_dropout", (x,))
                x.meta["val"] = x.args[0].meta.get("val")
            if adapter.scaling == 1:
                xa = emit("xa", "call_function", aten.linear.default, (x, lora_A), _linear_val)
            else:
                down = emit("down", "call_function", aten.linear.default, (x, lora_A), _linear_val)
                xa = emit("xa", "call_function", aten.mul.Tensor, (down, adapter.scaling), _same_val)
            xab = emit("xab", "call_function", aten.linear.default, (xa, lora_B), _linear_val)
            out = emit("out", "call_function", aten.add.Tensor, (node, xab), _same_val)
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _rewrite_experts(gm: fx.GraphModule, node: fx.Node, adapter: Adapter) -> None:
    """The experts' matmul ``expert_linear(x, w, offs)`` with its adapter: ``xa = expert_xa(x, offs,
    lora_A, scaling)``, ``expert_linear(x, w, offs, xa, lora_B)``."""
    graph, path = gm.graph, adapter.path
    x, w, offs = expert_operands(node)
    with graph.inserting_before(node):
        lora_A = get_attr(gm, node, f"{path}.lora_A.weight")
        lora_B = get_attr(gm, node, f"{path}.lora_B.weight")
        xa = new_node(graph, node, "call_function", expert_xa, (x, offs, lora_A, adapter.scaling))
    set_fake_val(xa, lambda x, offs, lora_A, scaling: x.new_empty((x.shape[0], adapter.r), dtype=lora_A.dtype), gm)
    out = replace_node(node, "call_function", expert_linear, (x, w, offs, xa, lora_B))
    for n, role in ((lora_A, "lora_A"), (lora_B, "lora_B"), (xa, "xa"), (out, "out")):
        meta.annotate(n, adapter=path, role=role)
    graph.erase_node(node)


# The branch's values are shaped like its input: made directly, since running linear on
# symbolic fake tensors (its decomposition, guard by guard) is ten times slower and adapting
# is done once per rank the planner tries.
def _linear_val(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.result_type(x, weight))


def _same_val(x: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.result_type(x, other))


def _compute_dtype(weight: torch.Tensor, node: fx.Node) -> torch.dtype:
    # Quantised base weights (bitsandbytes) compute in a float dtype of their own: the op's output's.
    if weight.dtype.is_floating_point:
        return weight.dtype
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def _add_adapter_params(
    gm: fx.GraphModule, adapter: Adapter, weight: torch.Tensor, dtype: torch.dtype, config: LoraFAConfig,
    generator: torch.Generator,
) -> None:
    lora_A = nn.Linear(adapter.in_features, adapter.folded_r, bias=False, device="meta", dtype=dtype)
    lora_B = nn.Linear(adapter.folded_r, adapter.out_features, bias=False, device="meta", dtype=dtype)
    if is_fake(weight):
        # A model built under FakeTensorMode (planning a 70B model from its config): the
        # adapters stay fake too, so planning allocates no parameter memory.
        with weight.fake_mode:
            lora_A.to_empty(device=weight.device)
            lora_B.to_empty(device=weight.device)
    else:
        lora_A.to_empty(device=weight.device)
        lora_B.to_empty(device=weight.device)
        _init_lora_A(lora_A.weight, config.init_lora_A, adapter.r, generator)
        nn.init.zeros_(lora_B.weight)
    lora_A.weight.requires_grad_(False)
    gm.add_submodule(f"{adapter.path}.lora_A", lora_A)
    gm.add_submodule(f"{adapter.path}.lora_B", lora_B)
    if config.lora_dropout:
        gm.add_submodule(f"{adapter.path}.lora_dropout", nn.Dropout(config.lora_dropout))


@torch.no_grad()
def _init_lora_A(w: torch.Tensor, how: str, r: int, generator: torch.Generator) -> None:
    # Drawn on the CPU generator then copied, so the same seed gives the same A on any device.
    cpu = torch.empty(w.shape, dtype=torch.float32)
    if how == "kaiming_uniform":
        nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
    elif how == "gaussian":
        nn.init.normal_(cpu, std=1 / r, generator=generator)
    elif how == "orthogonal":
        nn.init.orthogonal_(cpu, generator=generator)
    else:
        cpu.fill_(1.0)
    w.copy_(cpu)
