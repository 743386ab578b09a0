"""The composed simulation (memory/compose.py) against the whole-graph simulation it stands for.

Reference: `CostModel` (and the FSDP2 / DDP rank models) simulating every node of the graph.
The composed estimate must give the same peak, peak phase and block, saved bytes per block and
per node, for the unplanned graph and for recomputation decisions (the planner's candidates).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cached_capture
from transformers import AutoModelForCausalLM, MistralConfig

from lorafa_fx import LoraFAConfig
from lorafa_fx.captured_model import CapturedModel
from lorafa_fx.choices import Decision, Sharding
from lorafa_fx.graph import block_ranges
from lorafa_fx.memory.compose import ComposedSimulator
from lorafa_fx.memory.cost_model import CostModel
from lorafa_fx.memory.sharded_cost_model import rank_cost_model
from lorafa_fx.stages import REALISE
from lorafa_fx.units import block_of_path
from lorafa_fx.zoo import _CLASSES, _CONFIGS, CONFIG_KWARGS, make_batch

LAYERS = 7
SHAPE = (2, 12)


def _deep(name: str, layers: int = LAYERS) -> torch.nn.Module:
    """The zoo's test model of architecture `name`, `layers` deep (mistral: a small preset family)."""
    torch.manual_seed(0)
    if name == "mistral":
        config = MistralConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, sliding_window=None)
        return AutoModelForCausalLM.from_config(config)
    test = _CONFIGS[name]["test"]
    fields = test.to_dict()
    fields.pop("layer_types", None)  # per-layer attention kinds: rebuilt for the new depth
    for field in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        if field in fields:
            fields[field] = layers
    return _CLASSES[name](type(test)(**fields))


def _graph(name: str, layers: int = LAYERS, **config) -> tuple[torch.fx.GraphModule, dict]:
    batch = make_batch("llama" if name == "mistral" else name, *SHAPE)
    lora = LoraFAConfig(r=4, **{**CONFIG_KWARGS.get(name, {}), **config})
    return CapturedModel(_deep(name, layers), batch, lora, capture=cached_capture).build(), batch


def _same(whole, composed) -> None:
    assert composed.peak == whole.peak
    assert (composed.peak_phase, composed.peak_module) == (whole.peak_phase, whole.peak_module)
    assert composed.saved_activations == whole.saved_activations
    assert composed.saved_by_module == whole.saved_by_module
    assert composed.saved_by_node == whole.saved_by_node
    assert (composed.weights, composed.optimizer_states) == (whole.weights, whole.optimizer_states)


def _decisions(gm: torch.fx.GraphModule) -> list[dict[str, str]]:
    """Unplanned; the first block recomputed (the rest a run); every block; every other block
    (no run to compose: simulated whole)."""
    blocks = list(block_ranges(gm.graph))
    return [{}, {blocks[0]: Decision.RECOMPUTE}, {b: Decision.RECOMPUTE for b in blocks}, {b: Decision.RECOMPUTE for b in blocks[::2]}]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "roberta", "t5"])
def test_composed_step_equals_the_whole_graph_simulation(name):
    gm, batch = _graph(name, layers=5)
    whole, composed = CostModel(batch, realise=REALISE), ComposedSimulator(CostModel(batch, realise=REALISE))
    for decisions in _decisions(gm):
        _same(whole(gm, decisions), composed(gm, decisions))


def test_composition_samples_three_blocks_per_run_once_per_layout():
    gm, batch = _graph("llama")
    composed = ComposedSimulator(CostModel(batch, realise=REALISE))
    composed(gm, {})
    (sample,) = composed._samples.values()
    assert sample.runs == (("model.layers.0", "model.layers.1", f"model.layers.{LAYERS - 1}"),)
    # 3 and 4 recomputed blocks of 7 are both a recomputed run and a kept run of three or
    # more: the planner's second candidate is composed from the first one's sample.
    blocks = list(block_ranges(gm.graph))
    composed(gm, {b: Decision.RECOMPUTE for b in blocks[:3]})
    four = {b: Decision.RECOMPUTE for b in blocks[:4]}
    _same(CostModel(batch, realise=REALISE)(gm, four), composed(gm, four))
    assert len(composed._samples) == 2
    estimate = composed(gm, {})
    assert sorted({block_of_path(m) for m in estimate.saved_by_module if m.startswith("model.layers")}) == [
        f"model.layers.{i}" for i in range(LAYERS)
    ]


def test_composition_is_the_whole_simulation_where_nothing_repeats():
    gm, batch = _graph("llama", target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    composed = ComposedSimulator(CostModel(batch, realise=REALISE))
    _same(CostModel(batch)(gm), composed(gm))
    # Block 1 has another rank: runs of 1, 1 and 5 blocks; only the last is composed.
    (sample,) = composed._samples.values()
    assert sample.runs == (("model.layers.0",), ("model.layers.1",), ("model.layers.2", "model.layers.3", "model.layers.6"))


@pytest.mark.parametrize("sharding", list(Sharding))
def test_composed_rank_step_equals_the_whole_rank_simulation(sharding):
    gm, batch = _graph("llama")
    blocks = list(block_ranges(gm.graph))
    with rank_cost_model(batch, 4, sharding, REALISE) as whole, ComposedSimulator(rank_cost_model(batch, 4, sharding, REALISE)) as composed:
        for decisions in ({}, {b: Decision.RECOMPUTE for b in blocks[:3]}):
            w, c = whole(gm, decisions), composed(gm, decisions)
            assert c.peak == w.peak
            assert (c.peak_phase, c.peak_module) == (w.peak_phase, w.peak_module)
            assert c.saved_by_module == w.saved_by_module
            assert (c.weights, c.optimizer_states) == (w.weights, w.optimizer_states)


def test_composed_step_equals_the_whole_for_the_planners_mixes():
    """Mixes of every decision in runs (`memory/mix.py`'s layout): offloaded blocks, offloaded
    checkpoints, MLPs offloaded, recomputed selectively or in mini-sequence chunks, offloaded
    blocks recomputing their gate/up."""
    gm, batch = _graph("llama", layers=13)
    blocks = list(block_ranges(gm.graph))
    runs = [
        [Decision.OFFLOAD] * 4 + [Decision.OFFLOAD_CHECKPOINT] * 4 + [Decision.OFFLOAD_MLP] * 4 + [Decision.KEEP],
        [Decision.OFFLOAD_MINI_SEQUENCE] * 5 + [Decision.SELECTIVE] * 4 + [Decision.KEEP] * 4,
        [Decision.KEEP] + [Decision.MINI_SEQUENCE] * 6 + [Decision.SELECTIVE] * 6,
        [Decision.OFFLOAD] * 6 + [Decision.OFFLOAD_SELECTIVE] * 6 + [Decision.KEEP],
    ]
    whole, composed = CostModel(batch, realise=REALISE), ComposedSimulator(CostModel(batch, realise=REALISE))
    for kinds in runs:
        decisions = dict(zip(blocks, kinds))
        _same(whole(gm, decisions), composed(gm, decisions))
    assert composed._samples  # composed, not simulated whole
