"""The PEFT reference and test helpers; the models and batches are `lorafa_fx.zoo`'s."""

from __future__ import annotations

import copy
import gc
import os
import sys
import warnings

import pytest
import torch
import torch._inductor.config
from torch._subclasses.fake_tensor import is_fake
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

import lorafa_fx
from lorafa_fx import api, pipeline
from lorafa_fx.capture import capture
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.graph import block_ranges, graph_copy
from lorafa_fx.measure import measure_peak_bytes
from lorafa_fx.plan_config import resolve, with_budget
from lorafa_fx.zoo import ARCHITECTURES as MODELS  # noqa: F401  (re-exported for the tests)
from lorafa_fx.zoo import CONFIG_KWARGS, VOCAB, make_batch, make_model, make_task_model  # noqa: F401

_TRANSFORMED: dict[str, tuple[torch.nn.Module, torch.fx.GraphModule]] = {}
_CAPTURES: dict[tuple, torch.fx.GraphModule] = {}


def cached_capture(model: torch.nn.Module, example_inputs: dict) -> torch.fx.GraphModule:
    """`lorafa_fx.capture.capture`, once per session for each model structure and batch: a later
    call with an equal model (class, config, modules, dtypes) and an equal batch (same values;
    fake batches: same shapes) gets the first capture's graph over its own parameters and buffers.

    Capturing (torch.export, ~2 s) is most of a test's time and most tests capture the same tiny
    models; the graph depends on the model's code, config and dtypes and on the batch, never on
    the weights' values. `CapturedModel` takes the capture function, so tests inject this one.
    """
    key = _capture_key(model, example_inputs)
    if key is None:
        return capture(model, example_inputs)
    if key not in _CAPTURES:
        _CAPTURES[key] = capture(model, example_inputs)
    return _rebound(_CAPTURES[key], model)


def _capture_key(model: torch.nn.Module, example_inputs: dict) -> tuple | None:
    config = getattr(model, "config", None)
    if config is None or any("bitsandbytes" in type(m).__module__ for m in model.modules()):
        return None
    batch = tuple(
        # A fake batch (estimate's) has no values: its graph depends on its shapes alone.
        (k, tuple(v.shape), v.dtype, v.device.type, None if is_fake(v) else _digest(v)) if isinstance(v, torch.Tensor)
        else (k, repr(v))
        for k, v in sorted(example_inputs.items())
    )
    modules = tuple((name, type(m).__qualname__) for name, m in model.named_modules())
    tensors = tuple((name, t.dtype, t.device.type, t.requires_grad)
                    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()])
    return (type(model), config.to_json_string(), getattr(config, "_attn_implementation", None), modules, tensors, batch)


def _digest(t: torch.Tensor) -> int:
    return hash(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _rebound(cached: torch.fx.GraphModule, model: torch.nn.Module) -> torch.fx.GraphModule:
    """`cached`'s graph (a copy) reading `model`'s parameters, buffers and submodules; what the
    capture added of its own (the input guards) comes from `cached`."""
    owned = {}
    for node in cached.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            source = model if _has(model, node.target) else cached
            owned[node.target] = source.get_submodule(node.target) if node.op == "call_module" else _attr(source, node.target)
    gm = torch.fx.GraphModule(owned, graph_copy(cached).graph)
    for name in ("_in_spec", "_out_spec", "meta", "shape_env", "range_constraints"):
        if hasattr(cached, name):
            setattr(gm, name, getattr(cached, name))
    return gm


def _has(module: torch.nn.Module, target: str) -> bool:
    try:
        _attr(module, target)
        return True
    except AttributeError:
        return False


def _attr(module: torch.nn.Module, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


#: `estimate`'s captures of a config (`lorafa_fx.api._captured`: the model built with fake
#: weights, captured and adapted), by config, shape, LoraFAConfig and dtype; see `_estimate_captured`.
_ESTIMATE_CAPTURES: dict[tuple, tuple[CapturedModel, object, tuple[str, ...]]] = {}
_uncached_captured = api._captured
#: The running test's request (`_current_request`), for `_estimate_captured`'s check of its monkeypatches.
_REQUEST: list[pytest.FixtureRequest] = []
#: What a test may monkeypatch and still share `estimate`'s captures: what planning and the ops
#: read (memory/, ops/, the planner's regions pass) and the device readings (psutil, torch.cuda);
#: never the model's code, capture or the capture-time passes.
_PLANNING_MODULES = ("lorafa_fx.memory", "lorafa_fx.ops", "lorafa_fx.passes.recompute_regions", "psutil", "torch.cuda")


def _estimate_captured(model_or_config, batch_size, seq_len, config, dtype, progress):
    """`lorafa_fx.api._captured` (what `estimate`, `largest_batch_size`, the CLI and the benches
    capture a config with), once per session for each config, shape, `LoraFAConfig` and dtype:
    a later call gets the first call's `CapturedModel` (a sweep plans one capture at many shapes
    and budgets the same way) and the progress lines the capture gave, replayed to its `progress`.

    A capture that warns is not kept (its warnings are re-issued as they came; every later call
    captures anew and warns itself), nor is one made while the test monkeypatches anything but
    what planning reads (`_PLANNING_MODULES`). A model (not a config) is always captured anew.
    """
    key = _estimate_key(model_or_config, batch_size, seq_len, config, dtype)
    if key is None:
        return _uncached_captured(model_or_config, batch_size, seq_len, config, dtype, progress)
    if key in _ESTIMATE_CAPTURES:
        captured, batch_of, lines = _ESTIMATE_CAPTURES[key]
        for line in lines:
            progress(line)
        return captured, batch_of
    lines: list[str] = []

    def recording(line: str) -> None:
        lines.append(line)
        progress(line)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            captured, batch_of = _uncached_captured(model_or_config, batch_size, seq_len, config, dtype, recording)
    finally:  # under the caller's filters again
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if not caught:
        _ESTIMATE_CAPTURES[key] = captured, batch_of, tuple(lines)
    return captured, batch_of


def _estimate_key(model_or_config, batch_size, seq_len, config, dtype) -> tuple | None:
    if not isinstance(model_or_config, PretrainedConfig) or _patched_beyond_planning():
        return None
    return (type(model_or_config), model_or_config.to_json_string(),
            getattr(model_or_config, "_attn_implementation", None), batch_size, seq_len, repr(config), dtype,
            torch.get_default_dtype(), torch.is_grad_enabled(), torch.is_autocast_enabled())


def _patched_beyond_planning() -> bool:
    request = _REQUEST[-1] if _REQUEST else None
    if request is None or "monkeypatch" not in request.fixturenames:
        return False
    patched = request.getfixturevalue("monkeypatch")
    if patched._setitem:
        return True
    for owner, _, _ in patched._setattr:
        module = owner.__name__ if isinstance(owner, type(sys)) else getattr(owner, "__module__", "")
        if not module.startswith(_PLANNING_MODULES):
            return True
    return False


api._captured = _estimate_captured


@pytest.fixture(autouse=True)
def _current_request(request):
    _REQUEST.append(request)
    yield
    _REQUEST.pop()


def transform(model, budget=None, *, example_inputs, config=None, plan=None) -> torch.fx.GraphModule:
    """`lorafa_fx.transform` with the session's `cached_capture` (tests of transform's own checks,
    errors and warnings call `lorafa_fx.transform`)."""
    captured = CapturedModel(model, example_inputs, config or lorafa_fx.LoraFAConfig(), capture=cached_capture)
    return pipeline.emit(captured, model, example_inputs, resolve(with_budget(plan, budget), model))


def transformed(name: str, shape: tuple[int, int] = (2, 8), *, budget=None, model_fn=None, head=None, **config):
    """``(model, transform(model, budget, example_inputs=make_batch(name, *shape),
    config=LoraFAConfig(**CONFIG_KWARGS[name], **config)))`` for a fresh seeded ``model``
    (``make_task_model(name, head)`` and its batch with `head`).

    Each argument set is transformed once per session (transform is deterministic), and every
    caller gets a deep copy of the pair (copied together, so the copy of gm still shares the copy
    of the model's weights).
    """
    key = repr((name, shape, budget, model_fn, head, sorted(config.items())))
    if key not in _TRANSFORMED:
        model = make_task_model(name, head) if head else (model_fn or make_model)(name)
        config = lorafa_fx.LoraFAConfig(**{**(CONFIG_KWARGS.get(name, {}) if head is None else {}), **config})
        _TRANSFORMED[key] = model, transform(model, budget, example_inputs=make_batch(name, *shape, head=head),
                                             config=config)
    return copy.deepcopy(_TRANSFORMED[key])


def peft_reference(model: torch.nn.Module, gm: torch.fx.GraphModule, lora_A_trainable: bool = False):
    """PEFT LoRA on a copy of `model` with the same targets/ranks/scalings as `gm`.

    Its ``lora_A`` are copied from `gm` (frozen unless `lora_A_trainable`), its ``lora_B``
    from `gm`'s, so both compute the same function.
    """
    from peft import LoraConfig, get_peft_model

    cfg = gm.lorafa.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
            exclude_modules=cfg.exclude_modules, rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern), use_rslora=cfg.use_rslora,
            lora_dropout=cfg.lora_dropout, modules_to_save=cfg.modules_to_save))
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_B.weight"))
            layer.lora_A["default"].weight.requires_grad_(lora_A_trainable)
    return ref


def peft_lora_B(ref, path: str) -> torch.nn.Parameter:
    return ref.base_model.model.get_submodule(path).lora_B["default"].weight


def word_tokenizer():
    """A word-level tokenizer over the test vocabulary ("t0".."t95", split on spaces; pad t0, eos t1):
    TRL's trainers want one, and nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1")


def compiled_step(gm: torch.fx.GraphModule, batch: dict, measure_saved) -> tuple[object, torch.Tensor]:
    """One step of ``torch.compile(gm, backend="aot_eager", fullgraph=True)`` on `batch` from
    zero grads: (`measure_saved(forward)` of its forward, the loss); grads land on `gm`."""
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    out = {}

    def forward() -> torch.Tensor:
        out["loss"] = compiled(**batch).loss
        return out["loss"]

    gm.zero_grad(set_to_none=True)
    saved = measure_saved(forward)
    out["loss"].backward()
    return saved, out["loss"]


def randomize_lora_B(gm: torch.fx.GraphModule, seed: int = 2, scale: float = 0.1) -> None:
    """B starts at zero; a random B makes the adapter's contribution visible in the outputs (a `scale`
    of 1 changes a tiny model's greedy tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gm.lorafa.adapters:
            b = gm.get_parameter(f"{a.path}.lora_B.weight")
            b.copy_(torch.randn(b.shape, generator=g) * scale)


def random_lora_llama(layers: int = 4) -> tuple[torch.fx.GraphModule, dict, list[str]]:
    """A seeded Llama of `layers` small layers transformed at r 8 with every trained parameter
    drawn at random (B = 0 would hide the adapters from the loss), its batch and its blocks."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4, vocab_size=96,
        max_position_embeddings=128))
    batch = make_batch("llama", 2, 32)
    gm = transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(r=8))
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(3))
    return gm, batch, list(block_ranges(gm.graph))


def step_grads(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of `module` from zeroed grads: the loss and every trained
    parameter's grad, by name (a compiled module's names without ``_orig_mod.``)."""
    module.zero_grad(set_to_none=True)
    out = module(**batch)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def lora_B_loss_and_grads(module: torch.nn.Module, gm: torch.fx.GraphModule, batch: dict):
    """The loss of `module` (gm or its compiled form) and `gm`'s lora_B grads, in adapter order,
    with dropout masks seeded alike."""
    torch.manual_seed(0)
    loss = module(**batch).loss
    loss.backward()
    return loss.detach(), [gm.get_parameter(f"{a.path}.lora_B.weight").grad for a in gm.lorafa.adapters]


def adamw_peak(module: torch.nn.Module, batch: dict, trained: torch.nn.Module | None = None) -> int:
    """MemTracker's peak of the second AdamW step of `module` on `batch` (the first allocates the
    optimizer states); `trained`: the module owning the parameters, where `module` is its
    compiled form."""
    owner = module if trained is None else trained
    opt = torch.optim.AdamW([p for p in owner.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        module(**batch).loss.backward()
        opt.step()

    step()
    return measure_peak_bytes(step, owner, opt, batch)


#: One torch thread per test process, and for the processes tests start (CLI, torchrun, bench):
#: CI runs two xdist workers on two cores, and a worker's second intra-op thread waits for a core
#: the other worker holds at every parallel op (a tiny model's step took up to 10 s instead of
#: 0.05 s; test_plan_memory ran 2.3x slower). Set again before each test: a bench sets its own.
#: Inductor compiles its kernels in the test's process too, not in a pool of 2 compile
#: processes that each worker would start (and that would share the same 2 cores).
THREADS = 1
os.environ["OMP_NUM_THREADS"] = os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)
torch._inductor.config.compile_threads = THREADS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test, its garbage collected and what survives it frozen (`gc.freeze`).

    What the session keeps (imports, the capture caches, compiled code: ~4M objects per worker by
    the end) was traversed by every full collection, ~3 s each: Python's own, one per 25% of
    growth, and Trainer's `gc.collect()` at every train(); together a fifth of the suite's time.
    Frozen objects are never traversed again, so a collection walks one test's objects only.
    """
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
