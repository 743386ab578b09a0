"""torch.compile of the transformed module: same numbers as eager, annotations honoured."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import VOCAB, make_batch, make_model, randomize_lora_B, transform
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils.checkpoint import CheckpointPolicy
from transformers import LlamaConfig, LlamaForCausalLM

from lorafa_fx import LoraFAConfig
from lorafa_fx.measure import module_state, saved_activation_bytes

pytestmark = pytest.mark.slow
R = 4


def _build(name="llama"):
    gm = transform(make_model(name), example_inputs=make_batch(name, 2, 16), config=LoraFAConfig(r=R))
    randomize_lora_B(gm)
    return gm


def _lora_B(gm):
    return [gm.get_parameter(f"{a.path}.lora_B.weight") for a in gm.lorafa.adapters]


def test_compiled_loss_grads_and_adamw_steps_equal_eager():
    """Reference: the same GraphModule run eagerly, for one backward and three AdamW steps."""
    eager, compiled_gm = _build(), _build()
    compiled = torch.compile(compiled_gm)
    batches = [make_batch("llama", 3, 11, seed=s) for s in range(3)]
    opts = [torch.optim.AdamW(_lora_B(m), lr=1e-2) for m in (eager, compiled_gm)]
    for i, batch in enumerate(batches):
        losses = []
        for module, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = module(**batch).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
        if i == 0:
            for b_c, b_e in zip(_lora_B(compiled_gm), _lora_B(eager)):
                torch.testing.assert_close(b_c.grad, b_e.grad, atol=1e-5, rtol=1e-4)
        for opt in opts:
            opt.step()
    for b_c, b_e in zip(_lora_B(compiled_gm), _lora_B(eager)):
        torch.testing.assert_close(b_c, b_e, atol=1e-5, rtol=1e-4)


def test_partitioner_sees_must_save_and_saves_xa():
    """The annotate pass's CheckpointPolicy reaches AOTAutograd: every xa is saved as (b*s, r)."""
    gm = _build()
    seen = {}

    def partition(joint, inputs, **kwargs):
        # xa = scaling * x A^T: the mul of the (b, s, r) product (an mm when scaling is 1)
        seen["must_save_xa"] = sum(
            n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE and n.meta["val"].shape[-1] == R
            for n in joint.graph.nodes
        )
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        outputs = next(iter(fw.graph.find_nodes(op="output"))).args[0]
        seen["saved_rank_r"] = sum(
            isinstance(v := o.meta.get("val"), torch.Tensor) and tuple(v.shape) == (2 * 16, R)
            for o in outputs if isinstance(o, torch.fx.Node)
        )
        return fw, bw

    def backend(graph, example_inputs):
        return aot_module_simplified(
            graph, example_inputs, fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=partition
        )

    torch.compile(gm, backend=backend, dynamic=False)(**make_batch("llama", 2, 16)).loss.backward()
    n = len(gm.lorafa.adapters)
    assert seen["must_save_xa"] >= n
    assert seen["saved_rank_r"] == n


def _boxed(graph, _):
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(graph.forward)


def test_compiled_step_saves_no_more_than_eager_even_from_warm_caches():
    """AOTAutograd's cache key ignores node.meta. Our annotation is a function of the graph code
    alone (every linear on a lora_A weight is MUST_SAVE), so a cache hit for the same code has the
    same annotations: a second compile in the process saves exactly what the first did."""
    batch = make_batch("llama", 2, 16)
    eager = _build()
    eager_bytes = saved_activation_bytes(lambda: eager(**batch).loss, module_state(eager))
    compiled_bytes = []
    for _ in range(2):
        gm = _build()
        step = torch.compile(gm)
        step(**batch).loss.backward()  # compile (first: cold caches; second: warm)
        compiled_bytes.append(saved_activation_bytes(lambda: step(**batch).loss, module_state(gm)))
    # Around the loss Inductor's partitioner keeps two per-token fp32 statistics (b*s values each)
    # and the padded labels (one more column of int64) where eager keeps the shifted labels: the
    # one difference; the blocks (adapters, lean norms and MLPs) keep the same tensors.
    b, s = 2, 16
    loss_partition = 2 * b * s * 4 + b * 8
    assert compiled_bytes[0] == compiled_bytes[1] <= eager_bytes + loss_partition, (compiled_bytes, eager_bytes)


def test_compiling_more_modules_than_the_recompile_limit_compiles_each():
    """Reference: each module run eagerly. Dynamo keeps `recompile_limit` compilations per code
    object; each transformed module's forward is a code object of its own, so a process compiling
    more modules than that (here 2 with a limit of 1) compiles every one instead of failing the
    fullgraph compile of the second."""
    batch = make_batch("llama", 2, 8)
    with torch._dynamo.config.patch(recompile_limit=1):
        for kv_heads in (1, 2):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=kv_heads, vocab_size=VOCAB))
            gm = transform(model, example_inputs=batch, config=LoraFAConfig(r=R))
            randomize_lora_B(gm)
            compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(**batch).loss, gm(**batch).loss, atol=1e-6, rtol=0)
