"""Tiny seeded models built from configs (no downloads), and the PEFT reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=128))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
        bos_token_id=0, eos_token_id=0))


def _roberta():
    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=130, num_labels=3, pad_token_id=1))


def _t5():
    return T5ForConditionalGeneration(T5Config(
        d_model=64, d_ff=112, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "roberta": _roberta, "t5": _t5}

#: Arguments each architecture needs beyond the defaults (RoBERTa trains its head in full).
CONFIG_KWARGS = {"roberta": {"modules_to_save": ["classifier"]}}


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def make_batch(name: str, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "roberta":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif name == "t5":
        out["labels"] = torch.randint(2, VOCAB, (batch, max(seq // 2, 2)), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


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


def randomize_lora_B(gm: torch.fx.GraphModule, seed: int = 2) -> None:
    """B starts at zero; a random B makes the adapter's contribution visible in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gm.lorafa_adapters:
            b = gm.get_parameter(f"{a.path}.lora_B.weight")
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
