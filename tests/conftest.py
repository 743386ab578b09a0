"""The PEFT reference and test helpers; the models and batches are `lorafa_fx.zoo`'s."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorafa_fx
from lorafa_fx import pipeline
from lorafa_fx.capture import capture
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.graph import graph_copy
from lorafa_fx.plan_config import PlanConfig, resolve
from lorafa_fx.zoo import ARCHITECTURES as MODELS  # noqa: F401  (re-exported for the tests)
from lorafa_fx.zoo import CONFIG_KWARGS, VOCAB, make_batch, make_model  # noqa: F401

_TRANSFORMED: dict[str, tuple[torch.nn.Module, torch.fx.GraphModule]] = {}
_MODELS: dict[str, torch.nn.Module] = {}
_CAPTURED: dict[str, torch.fx.GraphModule] = {}


def transformed(name: str, shape: tuple[int, int] = (2, 8), *, budget=None, model_fn=None, **config):
    """``(model, lorafa_fx.transform(model, budget, example_inputs=make_batch(name, *shape),
    config=LoraFAConfig(**CONFIG_KWARGS[name], **config)))`` for a fresh seeded ``model``.

    Capturing (torch.export) is most of a test's time, and transform is deterministic: each
    argument set is transformed once per session, budgets of one model and config share one
    model and its capture (the pipeline's `CapturedModel` takes the capture function), and every
    caller gets a deep copy of the pair (copied together, so the copy of gm still shares the copy
    of the model's weights). Tests that check what transform itself warns or raises call it
    directly.
    """
    key = repr((name, shape, budget, model_fn, sorted(config.items())))
    if key not in _TRANSFORMED:
        model_key = repr((name, shape, model_fn, sorted(config.items())))
        if model_key not in _MODELS:
            _MODELS[model_key] = (model_fn or make_model)(name)
        model = _MODELS[model_key]

        def capture_once(model, example_inputs):
            if model_key not in _CAPTURED:
                _CAPTURED[model_key] = capture(model, example_inputs)
            return graph_copy(_CAPTURED[model_key])

        config = lorafa_fx.LoraFAConfig(**{**CONFIG_KWARGS.get(name, {}), **config})
        batch = make_batch(name, *shape)
        captured = CapturedModel(model, batch, config, capture=capture_once)
        _TRANSFORMED[key] = model, pipeline.emit(captured, model, batch, resolve(PlanConfig(budget=budget), model))
    return copy.deepcopy(_TRANSFORMED[key])


def peft_reference(model: torch.nn.Module, gm: torch.fx.GraphModule, lora_A_trainable: bool = False):
    """PEFT LoRA on a copy of `model` with the same targets/ranks/scalings as `gm`.

    Its ``lora_A`` are copied from `gm` (frozen unless `lora_A_trainable`), its ``lora_B``
    from `gm`'s, so both compute the same function.
    """
    from peft import LoraConfig, get_peft_model

    cfg = gm.lorafa_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
            exclude_modules=cfg.exclude_modules, rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern), use_rslora=cfg.use_rslora,
            lora_dropout=cfg.lora_dropout, modules_to_save=cfg.modules_to_save))
    with torch.no_grad():
        for a in gm.lorafa_adapters:
            layer = ref.base_model.model.get_submodule(a.path)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_A.weight"))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(f"{a.path}.lora_B.weight"))
            layer.lora_A["default"].weight.requires_grad_(lora_A_trainable)
    return ref


def peft_lora_B(ref, path: str) -> torch.nn.Parameter:
    return ref.base_model.model.get_submodule(path).lora_B["default"].weight


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
        for a in gm.lorafa_adapters:
            b = gm.get_parameter(f"{a.path}.lora_B.weight")
            b.copy_(torch.randn(b.shape, generator=g) * scale)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
