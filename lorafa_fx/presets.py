"""Configs of well-known models, written out so planning needs no download."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from transformers import AutoConfig, LlamaConfig, MistralConfig, MixtralConfig, PretrainedConfig, Qwen3MoeConfig
from transformers import __version__ as transformers_version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .checks import check_model_config
from .errors import ConfigError
from .json_fields import STRING, field, read_json_object


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, positions: int,
           **extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=positions, **extra)


PRESETS = {
    "llama-2-7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": lambda: _llama(5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": lambda: _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3-8b": lambda: _llama(4096, 14336, 32, 32, 8, 128256, 8192, rope_theta=500000.0),
    "llama-3-70b": lambda: _llama(8192, 28672, 80, 64, 8, 128256, 8192, rope_theta=500000.0),
    "mistral-7b": lambda: MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                        max_position_embeddings=32768, sliding_window=None),
    # Mixtral-8x7B-v0.1: 8 experts of width 14336, 2 per token.
    "mixtral-8x7b": lambda: MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                          max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                                          rope_theta=1e6, sliding_window=None),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 per token, in every layer.
    "qwen3-30b-a3b": lambda: Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                            head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def load_config(name_or_path: str) -> PretrainedConfig:
    """A preset name, or a ``config.json`` file (or the directory holding one); a file that is
    not a valid config (unreadable, a wrong-typed or degenerate field) raises `ConfigError`
    naming the file and the field."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file or directory."
        )
    data = read_json_object(path, ConfigError, "pass a transformers config.json")
    model_type = field(data, "model_type", STRING, path, ConfigError, "a transformers config.json names its "
                       "architecture, e.g. \"model_type\": \"llama\"")
    # Sizes first, as the file has them: transformers logs warnings about some (vocab_size=-1), then accepts them.
    check_model_config(SimpleNamespace(**data), str(path))
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{path}: model_type={model_type!r} is not an architecture transformers "
                          f"{transformers_version} knows: correct it, or install a transformers that has it.")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except Exception as e:  # transformers' own checks raise ValueError, KeyError or huggingface_hub's errors
        problem = _first_lines(e)
        raise ConfigError(f"{path} is not a valid {model_type!r} config: {problem}; correct that field.") from None
    check_model_config(config, str(path))
    return config


def _first_lines(e: Exception) -> str:
    # transformers' validation errors put the field on the first line and the cause on the next.
    return " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())[:300] or type(e).__name__
