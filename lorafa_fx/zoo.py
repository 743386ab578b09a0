"""Small seeded models built from configs (no downloads) and their batches: the one model zoo
the demo, the tests and the benchmarks share, so their figures are about the same models.

``make_model(name, size)`` builds architecture `name` at a size: ``"test"`` (2 layers,
hidden 64: the test suite; the mixture-of-experts families `MOE_ARCHITECTURES` have 4 experts,
top 2, expert width 48), ``"demo"`` (the demo's Llama), ``"quick"`` and ``"full"`` (the
benchmarks' two modes; "full" is GPT-2 small, RoBERTa-base, T5-small and a 56M Llama).
``make_batch(model_or_name, batch, seq)`` is a seeded token batch with labels for the model's task.
``make_task_model(name, head)`` builds the family with another head (``"ForSequenceClassification"``,
``"ForTokenClassification"``, ``"ForQuestionAnswering"``, ``"ForCausalLM"``, ``"Model"``...), and
``make_batch(..., head=head)`` its batch; BERT, DeBERTa-v2 (DeBERTa-v3's relative attention) and
Mamba exist only this way, at the "test" size.
"""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import (
    BertConfig,
    DebertaV2Config,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
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
    "bert": {
        "test": BertConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=VOCAB, max_position_embeddings=128, num_labels=3),
    },
    "deberta-v2": {
        "test": DebertaV2Config(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=128, num_labels=3, relative_attention=True,
                                pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                                norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False),
    },
    "mamba": {
        "test": MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=128,
                            conv_kernel=4, time_step_rank=8),
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
#: Class-name prefix of each family, for `make_task_model`.
_PREFIXES = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT2", "roberta": "Roberta", "t5": "T5", "bert": "Bert",
             "deberta-v2": "DebertaV2", "mamba": "Mamba", "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe",
             "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe"}

#: `LoraFAConfig` fields each architecture needs beyond the defaults (RoBERTa trains its head in full).
CONFIG_KWARGS = {"roberta": {"modules_to_save": ["classifier"]}}


def make_model(name: str, size: str = "test", seed: int = 0) -> torch.nn.Module:
    """Architecture `name` (one of `ARCHITECTURES`) at `size`, weights drawn from `seed`."""
    torch.manual_seed(seed)
    return _CLASSES[name](_CONFIGS[name][size])


def make_task_model(name: str, head: str, size: str = "test", seed: int = 0) -> torch.nn.Module:
    """Family `name` with the head `head` (the class name's end: ``"ForSequenceClassification"``),
    weights drawn from `seed`. Sequence classifiers get ``pad_token_id`` 0 (decoders find each
    row's last token by it; batches never hold it), question answering two labels (start, end)."""
    config = copy.deepcopy(_CONFIGS[name][size])
    if head == "ForSequenceClassification" and config.pad_token_id is None:
        config.pad_token_id = 0
    if head == "ForQuestionAnswering":
        config.num_labels = 2
    torch.manual_seed(seed)
    return getattr(transformers, _PREFIXES[name] + head)(config)


def make_batch(name: str, batch: int, seq: int, seed: int = 1, size: str = "test", head: str | None = None
               ) -> dict[str, torch.Tensor]:
    """A batch for ``make_model(name, size)`` (or ``make_task_model(name, head, size)``): token ids
    in ``[2, vocab)``, an all-ones attention mask and labels: the ids (causal LM); ``seq // 2``
    target ids (T5); a class per row (sequence classification: RoBERTa's default head), per
    token (token classification), start and end positions (question answering); none for a bare
    ``"Model"``."""
    config = _CONFIGS[name][size]
    head = head or _CLASSES[name].__name__.removeprefix(_PREFIXES[name])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if head == "ForSequenceClassification":
        out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    elif head == "ForTokenClassification":
        out["labels"] = torch.randint(0, config.num_labels, (batch, seq), generator=g)
    elif head == "ForQuestionAnswering":
        out["start_positions"], out["end_positions"] = torch.randint(0, seq, (2, batch), generator=g)
    elif head == "ForConditionalGeneration":
        out["labels"] = torch.randint(2, config.vocab_size, (batch, max(seq // 2, 2)), generator=g)
    elif head != "Model":
        out["labels"] = ids.clone()
    return out
