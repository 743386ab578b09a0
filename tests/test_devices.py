"""Devices and input dtypes: a captured module takes them from its inputs and weights at run
time, as the eager model does, instead of the example batch's.

Capture used to leave ``device(type='cpu')`` literals (arange, masks, ``labels.to(...)``) and
export's ``_assert_tensor_metadata`` checks in the graph: a module captured with a bool
attention mask failed on an int one, and one moved with ``gm.to("cuda")`` would have built
its positions and masks on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_KWARGS, make_batch, make_model, peft_lora_B, peft_reference, randomize_lora_B, transform

from lorafa_fx import LoraFAConfig

SEQ = 12
ARCHS = ["llama", "qwen2", "gpt2", "roberta", pytest.param("t5", marks=pytest.mark.slow)]


def _bool_mask_batch(name: str, **kwargs) -> dict[str, torch.Tensor]:
    batch = make_batch(name, 2, SEQ, **kwargs)
    batch["attention_mask"] = batch["attention_mask"].bool()
    return batch


@pytest.fixture(scope="module")
def captured_with_bool_mask():
    """name -> (model, gm), each architecture transformed once from a batch with a bool mask."""
    cache: dict[str, tuple[torch.nn.Module, torch.fx.GraphModule]] = {}

    def get(name: str):
        if name not in cache:
            model = make_model(name).eval()
            gm = transform(model, example_inputs=_bool_mask_batch(name),
                                     config=LoraFAConfig(**CONFIG_KWARGS.get(name, {})))
            cache[name] = model, gm.eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", ARCHS)
def test_no_device_literal_or_metadata_assert_is_left(name, captured_with_bool_mask):
    """What would make ``gm.to("cuda")`` build constants on the CPU, or reject another dtype."""
    _, gm = captured_with_bool_mask(name)
    graphs = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    for g in graphs:
        assert "device(type='cpu')" not in g.code
        assert not g.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.float32])
@pytest.mark.parametrize("name", ARCHS)
def test_mask_of_another_dtype_with_padding_matches_the_model(name, mask_dtype, captured_with_bool_mask):
    """Captured with a bool mask, run with an int (a tokenizer's) or float mask whose first row
    ends in padding. Reference: the unmodified model on the same batch (B = 0), every position."""
    model, gm = captured_with_bool_mask(name)
    batch = make_batch(name, 2, SEQ, seed=3)
    batch["attention_mask"][0, SEQ - 4:] = 0
    batch["attention_mask"] = batch["attention_mask"].to(mask_dtype)
    torch.testing.assert_close(gm(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def _train_steps(module: torch.nn.Module, batch: dict, steps: int = 3) -> list[float]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_on_cpu_trains_on_cuda_like_peft():
    """Captured on the CPU, moved with ``gm.to("cuda")``, 3 AdamW steps under bf16 autocast, eager
    and compiled. Reference: PEFT LoRA with the same A (frozen) and B, on CUDA, eager: losses and
    final lora_B."""
    batch = {k: v.cuda() for k, v in make_batch("llama", 2, SEQ, seed=3).items()}
    config = LoraFAConfig(r=4, lora_alpha=8)
    runs = {}
    for mode in ("eager", "compiled"):
        model = make_model("llama")
        gm = transform(model, example_inputs=make_batch("llama", 2, SEQ), config=config)
        randomize_lora_B(gm)
        if mode == "eager":
            ref = peft_reference(model, gm).cuda()
            ref_losses = _train_steps(ref, batch)
        gm.to("cuda")
        losses = _train_steps(torch.compile(gm) if mode == "compiled" else gm, batch)
        runs[mode] = losses, gm
    for mode, (losses, gm) in runs.items():
        assert losses[-1] < losses[0], mode
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-2, atol=0, msg=mode)
        for a in gm.lorafa.adapters:
            b = gm.get_parameter(f"{a.path}.lora_B.weight")
            assert b.device.type == "cuda"
            torch.testing.assert_close(b, peft_lora_B(ref, a.path), rtol=2e-2, atol=2e-3, msg=f"{mode} {a.path}")
