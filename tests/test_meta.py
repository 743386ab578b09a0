"""The node.meta contract (lorafa_fx/meta.py): what each stage writes, read back from real graphs.

Later stages depend on these keys (outline_layers on BLOCK, the sharded cost model on LAYER,
the report on ROLE/ADAPTER/SAVED_BYTES); each test pins one of them on the tiny Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_batch, make_model, transform
from torch.utils.checkpoint import CheckpointPolicy

import lorafa_fx
from lorafa_fx import LoraFAConfig, meta
from lorafa_fx.choices import Decision
from lorafa_fx.graph import graph_copy
from lorafa_fx.measure import module_state, saved_activation_bytes
from lorafa_fx.passes.chunk_cross_entropy import ChunkCrossEntropy
from lorafa_fx.passes.outline_layers import OutlineLayers
from lorafa_fx.passes.recompute_regions import RecomputeRegions

B, S, R = 2, 8, 4


@pytest.fixture(scope="module")
def gm():
    return transform(make_model("llama"), example_inputs=make_batch("llama", B, S), config=LoraFAConfig(r=R))


def _annotated(gm, key):
    return [n for n in meta.all_graph_nodes(gm) if key in meta.lorafa_meta(n)]


def test_rewrite_writes_adapter_and_role_on_every_node_it_adds(gm):
    by_adapter: dict[str, list[str]] = {}
    for n in _annotated(gm, meta.ADAPTER):
        by_adapter.setdefault(meta.lorafa_meta(n)[meta.ADAPTER], []).append(meta.lorafa_meta(n)[meta.ROLE])
    assert sorted(by_adapter) == sorted(a.path for a in gm.lorafa.adapters)
    # scaling = alpha / r = 8 / 4 = 2: x A^T ("down") is scaled into xa
    assert all(sorted(roles) == sorted(["lora_A", "lora_B", "down", "xa", "xab", "out"]) for roles in by_adapter.values())
    assert set().union(*map(set, by_adapter.values())) <= set(meta.ADAPTER_ROLES)


def test_xa_is_must_save_for_the_partitioner_and_carries_its_saved_bytes(gm):
    xa = [n for n in _annotated(gm, meta.ROLE) if meta.lorafa_meta(n)[meta.ROLE] == "xa"]
    assert len(xa) == len(gm.lorafa.adapters)
    assert all(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in xa)
    assert {meta.lorafa_meta(n)[meta.SAVED_BYTES] for n in xa} == {B * S * R * 4}  # Table 1: b*s*r fp32


def test_saved_bytes_on_the_nodes_add_up_to_what_a_real_forward_saves(gm):
    """Reference: saved_tensors_hooks on a real forward of the example batch."""
    total = sum(meta.lorafa_meta(n)[meta.SAVED_BYTES] for n in _annotated(gm, meta.SAVED_BYTES))
    measured = saved_activation_bytes(lambda: gm(**make_batch("llama", B, S)).loss, module_state(gm))
    assert total == pytest.approx(measured, rel=0.02)


def test_recompute_regions_write_recompute_and_block_and_outline_layers_read_block(gm):
    planned = RecomputeRegions({"model.layers.1": Decision.RECOMPUTE})(graph_copy(gm)).graph_module
    regions = _annotated(planned, meta.RECOMPUTE)
    assert [(meta.lorafa_meta(n)[meta.RECOMPUTE], meta.lorafa_meta(n)[meta.BLOCK]) for n in regions] == [
        (Decision.RECOMPUTE, "model.layers.1")]
    outlined = OutlineLayers()(planned).graph_module
    layers = [n for n in outlined.graph.nodes if meta.LAYER in meta.lorafa_meta(n)]
    assert [meta.lorafa_meta(n)[meta.LAYER] for n in layers] == ["model.layers.0", "model.layers.1"]
    # BLOCK told outline_layers the region is layer 1's: it now runs inside that layer
    assert [meta.lorafa_meta(n)[meta.BLOCK] for n in _annotated(outlined.get_submodule("model.layers.1"), meta.BLOCK)] \
        == ["model.layers.1"]


def test_chunked_loss_roles(gm):
    chunked = ChunkCrossEntropy()(graph_copy(gm)).graph_module
    roles = sorted(meta.lorafa_meta(n)[meta.ROLE] for n in chunked.graph.nodes
                   if meta.lorafa_meta(n).get(meta.ROLE) in ("chunked_ce", "eval_logits"))
    assert roles == ["chunked_ce", "eval_logits"]


def test_annotate_refuses_keys_outside_the_schema(gm):
    node = next(iter(gm.graph.nodes))
    with pytest.raises(KeyError, match="saved_byte"):
        meta.annotate(node, saved_byte=1)


def test_the_contract_table_names_every_pass():
    passes = Path(lorafa_fx.__file__).parent / "passes"
    names = {p.stem for p in passes.glob("*.py") if not p.stem.startswith("_")}
    assert names and all(f"passes.{name}" in meta.__doc__ for name in names)


