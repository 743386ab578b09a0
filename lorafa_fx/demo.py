"""The embedded default job: LoRA-FA on a small Llama built from a config, no downloads.

Transforms the model, trains it for a few dozen AdamW steps on a synthetic next-token task
(sequences over a 32-token sub-vocabulary following ``t[i+1] = (5 * t[i] + 3) mod 32``), and
prints the loss falling next to the bytes one training step saves for backward under full
fine-tuning, PEFT LoRA, PEFT LoRA with A frozen and lorafa_fx.
"""

from __future__ import annotations

import copy
import warnings

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LoraFAConfig
from .measure import module_state, saved_activation_bytes
from .transform import transform

VOCAB = 256
TASK_VOCAB = 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def synthetic_batch(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = [torch.randint(0, TASK_VOCAB, (batch, 1), generator=generator)]
    for _ in range(seq - 1):
        tokens.append((5 * tokens[-1] + 3) % TASK_VOCAB)
    ids = torch.cat(tokens, dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(steps: int = 40, batch: int = 8, seq: int = 64, lr: float = 1e-2, console: Console | None = None) -> list[float]:
    console = console or Console()
    generator = torch.Generator().manual_seed(0)
    example = synthetic_batch(batch, seq, generator)
    model = tiny_llama()
    full_model = copy.deepcopy(model)
    config = LoraFAConfig(r=16, lora_alpha=32)
    gm = transform(model, example_inputs=example, config=config)
    n_train = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    console.print(
        f"[bold]lorafa_fx demo[/]: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{len(gm.lorafa_adapters)} LoRA-FA adapters (r={config.r}), {n_train / 1e3:.0f}k trainable"
    )

    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    gm.train()
    for step in range(steps):
        loss = gm(**synthetic_batch(batch, seq, generator)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            console.print(f"  step {step:3d}  loss {losses[-1]:.4f}")

    table = Table(title=f"Bytes saved for backward, one step (batch {batch}, seq {seq}, fp32)")
    table.add_column("method")
    table.add_column("saved activations", justify="right")
    table.add_column("vs full FT", justify="right")
    rows = [("full fine-tuning", _saved(full_model, example))]
    rows += _peft_rows(full_model, gm, example)
    rows.append(("lorafa_fx (LoRA-FA)", _saved(gm, example)))
    for name, nbytes in rows:
        table.add_row(name, f"{nbytes / 2**20:.2f} MiB", f"{nbytes / rows[0][1]:.2f}x")
    console.print(table)
    return losses


def _saved(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    return saved_activation_bytes(lambda: module(**batch).loss, exclude=module_state(module))


def _peft_rows(model, gm, batch) -> list[tuple[str, int]]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return []
    rows = []
    for name, train_A in (("PEFT LoRA", True), ("PEFT LoRA, A frozen", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=gm.lorafa_config.r, target_modules="all-linear"))
        for n, p in ref.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(train_A)
        rows.append((name, _saved(ref, batch)))
    return rows
