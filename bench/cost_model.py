"""Predicted memory of LoRA and LoRA-FA steps against the LoRA-FA paper's figures (Table 5, appendix B.1).

Each model of the paper's Table 5 is built from a config written here (no downloads) with fake
weights (`FakeTensorMode`), captured and rewritten by lorafa_fx's pipeline (`CapturedModel`:
capture, clean-ups, lean rewrites, adapters on all linears) and simulated by the cost model
(`memory.cost_model.CostModel`) for one AdamW step at the paper's batch, nothing recomputed:
once as LoRA-FA (the graph as lorafa_fx emits it) and once as LoRA (the same graph with every
``lora_A`` trainable, so backward keeps each adapted linear's input x), so the two columns
differ only by what LoRA adds. Peaks are the whole step's (weights, optimizer states, batch,
saved activations and backward transients); "act." is what autograd keeps at the end of
forward. GB = 10^9 bytes.

Why the predictions differ from the paper's measurements: the paper measured on A100 with
FlashAttention and DeepSpeed and does not state its Llama precision policy; lorafa_fx predicts
transformers' eager code on plain torch, after its lean rewrites (RMSNorms keep their input in
its own dtype and an fp32 rstd, not an fp32 copy; gated MLPs keep gate and up and recompute the
activation; multi-op activations such as gelu_new keep their input only; attention takes k/v
before ``repeat_kv`` and drops an all-true mask). What is left above a fused kernel stack is
chiefly the loss: transformers upcasts the logits to fp32 (the "fp32 logits" column, b·s·V·4
bytes) and backward makes their gradient. What LoRA-FA itself changes is LoRA minus LoRA-FA
(every adapted linear's input x, A's gradients and AdamW states): the comparable quantity.
For RoBERTa and T5 the paper gives no sequence length for Table 5: 128 here (its GLUE
setting), fp32. On the test suite's models the cost model's prediction is checked against
MemTracker's measured peak of a real step (`tests/test_estimate_memory.py`).
"""

from __future__ import annotations

import copy
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig, RobertaConfig, RobertaForSequenceClassification, T5Config

import lorafa_fx
from bench import _harness as H
from lorafa_fx import zoo
from lorafa_fx.api import model_from_config, token_batch
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.memory.cost_model import CostModel

GB = 1e9

LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    vocab_size=32000, max_position_embeddings=4096,
)
ROBERTA_BASE = RobertaConfig(num_labels=2)
ROBERTA_LARGE = RobertaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              num_labels=2)
T5_SMALL = T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, decoder_start_token_id=0)
T5_BASE = T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, decoder_start_token_id=0)

#: (name, config, batch, seq, rank, dtype, paper LoRA GB, paper LoRA-FA GB, paper activations LoRA/LoRA-FA GB)
CASES = [
    ("Llama-2-7B", LLAMA2_7B, 16, 1024, 64, torch.bfloat16, 76.74, 61.49, (55.58, 42.48)),
    ("RoBERTa-base", ROBERTA_BASE, 64, 128, 8, torch.float32, 9.2, 6.9, None),
    ("RoBERTa-large", ROBERTA_LARGE, 64, 128, 8, torch.float32, 22.5, 15.7, None),
    ("T5-small", T5_SMALL, 128, 128, 8, torch.float32, 29.4, 25.5, None),
    ("T5-base", T5_BASE, 64, 128, 8, torch.float32, 32.1, 25.3, None),
]
QUICK = ("RoBERTa-base", "T5-small")


def smoke_case() -> tuple:
    """The test suite's tiny Llama (no paper figures): seconds, and `lorafa_fx.estimate` builds the
    same model from its config, so its peak is a reference."""
    return ("zoo llama (test)", copy.deepcopy(zoo.make_model("llama", "test").config), 2, 16, 8, torch.float32,
            None, None, None)


def add_arguments(ap) -> None:
    ap.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")


def predict(config, batch: int, seq: int, rank: int, dtype: torch.dtype) -> dict:
    """Predicted peak and saved activations (bytes) of one AdamW step, as LoRA-FA and as LoRA."""
    roberta = isinstance(config, RobertaConfig)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = RobertaForSequenceClassification._from_config(config, dtype=dtype) if roberta else \
            model_from_config(config, dtype)
        inputs = token_batch(batch, seq)
        if roberta:
            inputs["labels"] = torch.zeros(batch, dtype=torch.long)
    lora = lorafa_fx.LoraFAConfig(r=rank, lora_alpha=2 * rank, modules_to_save=["classifier"] if roberta else None)
    gm = CapturedModel(model, inputs, lora).build()
    out = {}
    for method in ("lora_fa", "lora"):
        if method == "lora":  # LoRA: the same graph with A trained too
            for a in gm.lorafa.adapters:
                gm.get_parameter(f"{a.path}.lora_A.weight").requires_grad_(True)
        step = CostModel(inputs)(gm)
        out |= {f"peak_{method}_bytes": step.peak, f"activations_{method}_bytes": step.saved_activations}
    return out


def run(args) -> dict:
    cases = [smoke_case()] if args.smoke else [c for c in CASES if not args.quick or c[0] in QUICK]
    rows = []
    for name, config, batch, seq, rank, dtype, paper_lora, paper_fa, paper_act in cases:
        H.progress(f"{name}: batch {batch} x {seq}, r {rank}: capture, then LoRA-FA and LoRA steps simulated")
        t = time.perf_counter()
        row = {"model": name, "batch": batch, "seq": seq, "r": rank, "dtype": str(dtype).removeprefix("torch."),
               **predict(config, batch, seq, rank, dtype), "seconds": time.perf_counter() - t,
               "paper_lora_gb": paper_lora, "paper_lora_fa_gb": paper_fa, "paper_activations_gb": paper_act,
               "fp32_logits_bytes": batch * seq * config.vocab_size * 4 if not isinstance(config, RobertaConfig)
               else None}
        H.progress(f"{name}: peak LoRA-FA {row['peak_lora_fa_bytes'] / GB:.2f} GB, LoRA "
                   f"{row['peak_lora_bytes'] / GB:.2f} GB ({row['seconds']:.0f} s)")
        rows.append(row)
    return {"rows": rows}


def markdown(result: dict) -> str:
    def gb(x) -> str:
        return "-" if x is None else f"{x / GB:.2f}"

    def paper(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    cells = []
    for r in result["rows"]:
        act = r["paper_activations_gb"]
        diff = r["activations_lora_bytes"] - r["activations_lora_fa_bytes"]
        cells.append([
            r["model"], f"{r['batch']}x{r['seq']}, {r['r']}, {r['dtype']}", gb(r["peak_lora_bytes"]),
            gb(r["peak_lora_fa_bytes"]), paper(r["paper_lora_gb"]), paper(r["paper_lora_fa_gb"]),
            f"{r['peak_lora_fa_bytes'] / GB / r['paper_lora_fa_gb']:.2f}" if r["paper_lora_fa_gb"] else "-",
            gb(r["activations_lora_bytes"]), gb(r["activations_lora_fa_bytes"]),
            "/".join(f"{a:.2f}" for a in act) if act else "-", gb(diff),
            f"{act[0] - act[1]:.2f}" if act else "-", gb(r["fp32_logits_bytes"]), f"{r['seconds']:.0f}"])
    return H.md_table(
        ["model", "bs x seq, r, dtype", "peak LoRA", "peak LoRA-FA", "paper LoRA", "paper LoRA-FA",
         "LoRA-FA / paper", "act. LoRA", "act. LoRA-FA", "paper act. (B.1)", "act. LoRA - LoRA-FA",
         "paper act. LoRA - LoRA-FA", "fp32 logits", "time s"], cells)
