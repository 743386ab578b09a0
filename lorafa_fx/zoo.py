"""Small seeded models built from configs (no downloads) and their batches: the one model zoo
the demo, the tests and the benchmarks share, so their figures are about the same models.

``make_model(name, size)`` builds architecture `name` at a size: ``"test"`` (2 layers,
hidden 64: the test suite; the mixture-of-experts families `MOE_ARCHITECTURES` have 4 experts,
top 2, expert width 48), ``"demo"`` (the demo's Llama), ``"quick"`` and ``"full"`` (the
benchmarks' two modes; "full" is GPT-2 small, RoBERTa-base, T5-small and a 56M Llama).
``make_batch(model_or_name, batch, seq)`` is a seeded token batch with labels for the model's task.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

#: Vocabulary of the "test" size (small, so the tests' logits are small).
VOCAB = 96
_T5_IDS = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
_MOE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 128, "num_experts_per_tok": 2}

_CONFIGS: dict[str, dict[str, PretrainedConfig]] = {
    "llama": {
        "test": LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=128),
        "demo": LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
        "quick": LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512),
        "full": LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    },
    "qwen2": {
        "test": Qwen2Config(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    },
    "gpt2": {
        "test": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                           bos_token_id=0, eos_token_id=0),
        "quick": GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=512,
                            bos_token_id=0, eos_token_id=0),
        "full": GPT2Config(),
    },
    "roberta": {
        "test": RobertaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=VOCAB, max_position_embeddings=130, num_labels=3, pad_token_id=1),
        "quick": RobertaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                               vocab_size=8192, max_position_embeddings=514, num_labels=2),
        "full": RobertaConfig(num_labels=2),
    },
    "t5": {
        "test": T5Config(d_model=64, d_ff=112, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB, **_T5_IDS),
        "quick": T5Config(d_model=256, d_ff=1024, num_layers=3, num_heads=4, d_kv=64, vocab_size=8192, **_T5_IDS),
        "full": T5Config(**_T5_IDS),
    },
    "mixtral": {"test": MixtralConfig(intermediate_size=48, num_local_experts=4, **_MOE)},
    "qwen2_moe": {"test": Qwen2MoeConfig(intermediate_size=112, moe_intermediate_size=48, num_experts=4,
                                         shared_expert_intermediate_size=64, **_MOE)},
    "qwen3_moe": {"test": Qwen3MoeConfig(intermediate_size=112, moe_intermediate_size=48, num_experts=4, head_dim=16,
                                         **_MOE)},
    "olmoe": {"test": OlmoeConfig(intermediate_size=48, num_experts=4, pad_token_id=1, eos_token_id=0, **_MOE)},
}
_CLASSES = {
    "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel,
    "roberta": RobertaForSequenceClassification, "t5": T5ForConditionalGeneration,
    "mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
}
#: Mixture-of-experts families (transformers 5's fused experts); `ARCHITECTURES` are the dense ones.
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = tuple(name for name in _CLASSES if name not in MOE_ARCHITECTURES)

#: `LoraFAConfig` fields each architecture needs beyond the defaults (RoBERTa trains its head in full).
CONFIG_KWARGS = {"roberta": {"modules_to_save": ["classifier"]}}


def make_model(name: str, size: str = "test", seed: int = 0) -> torch.nn.Module:
    """Architecture `name` (one of `ARCHITECTURES`) at `size`, weights drawn from `seed`."""
    torch.manual_seed(seed)
    return _CLASSES[name](_CONFIGS[name][size])


def make_batch(name: str, batch: int, seq: int, seed: int = 1, size: str = "test") -> dict[str, torch.Tensor]:
    """A batch for ``make_model(name, size)``: token ids in ``[2, vocab)``, an all-ones
    attention mask and labels (the ids; a class for RoBERTa; ``seq // 2`` target ids for T5)."""
    config = _CONFIGS[name][size]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "roberta":
        out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    elif name == "t5":
        out["labels"] = torch.randint(2, config.vocab_size, (batch, max(seq // 2, 2)), generator=g)
    else:
        out["labels"] = ids.clone()
    return out
