"""The memory floor's levers (`choices.Decision`): offloaded checkpoints, selective recompute,
offloaded MLPs, offloaded blocks recomputing their MLP's gate, and mini-sequence chunks, realised by
passes/recompute_regions.py.

References: the unplanned step of the same graph (loss and every lora_B grad, bit for bit: the
levers move and recompute tensors, they do not change the math; the one exception is stated
where it is tested), and MemTracker's measured peak of a real step (the predicted peak within
5%). The CUDA streams are not exercised (no GPU in CI): on the CPU the offload path runs with
plain copies, and tensors under `ops.offload.MIN_BYTES` stay where they are.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import adamw_peak, lora_B_loss_and_grads, random_lora_llama, step_grads, transform
from transformers import LlamaConfig, LlamaForCausalLM

import lorafa_fx
from lorafa_fx.choices import Decision
from lorafa_fx.graph import block_ranges
from lorafa_fx.memory.cost_model import CostModel
from lorafa_fx.memory.simulate import with_decisions
from lorafa_fx.ops import offload as _offload
from lorafa_fx.ops import rows
from lorafa_fx.passes import recompute_regions
from lorafa_fx.stages import REALISE
from lorafa_fx.zoo import make_batch

LEVERS = [Decision.OFFLOAD_CHECKPOINT, Decision.SELECTIVE, Decision.OFFLOAD_MLP, Decision.OFFLOAD_SELECTIVE,
          Decision.MINI_SEQUENCE, Decision.OFFLOAD_MINI_SEQUENCE]
CHUNKED = (Decision.MINI_SEQUENCE, Decision.OFFLOAD_MINI_SEQUENCE, Decision.OFFLOAD_SELECTIVE)


@pytest.fixture(scope="module")
def llama():
    return random_lora_llama()


@pytest.mark.parametrize("lever", LEVERS)
def test_each_lever_trains_bit_for_bit_like_the_unplanned_step_eager_and_compiled(llama, lever, monkeypatch):
    """Every block takes `lever`, every saved tensor offloaded (MIN_BYTES 0). Chunked MLPs: the
    loss and every gradient but the MLPs' own lora_B are the same bits; those are sums over
    tokens taken a chunk at a time, equal to the unchunked sum up to its rounding (bitwise
    equality would need the MLP's b·s·intermediate gradients whole: the bytes chunking saves)."""
    monkeypatch.setattr(_offload, "MIN_BYTES", 0)
    gm, batch, blocks = llama
    loss, grads = step_grads(gm, batch)
    planned = with_decisions(gm, dict.fromkeys(blocks, lever), REALISE)
    # The offloader's hooks run eagerly under torch.compile: traced, they were compiled once per
    # saved tensor's shape and dtype, up to dynamo's recompile limit (here a failure, counted
    # from this test's compilations on).
    torch._dynamo.reset()
    # Eager twice: the second step starts afresh (nothing of the first is reused).
    for module, steps in ((planned, 2), (torch.compile(planned, backend="aot_eager"), 1)):
        for _ in range(steps):
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                got_loss, got = step_grads(module, batch)
            assert torch.equal(got_loss, loss)
            for name, grad in grads.items():
                if lever in CHUNKED and ".mlp." in name:
                    torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-8)
                else:
                    assert torch.equal(got[name], grad), name


def test_chunked_levers_under_bf16_autocast_train_like_the_unplanned_autocast_step(llama):
    """Forward under bf16 autocast, backward outside it (as Trainer and accelerate run a step):
    the chunks rerun in backward under the forward's autocast, so the loss and every gradient
    but the MLPs' own lora_B are the unplanned step's bits, and those (sums over chunks of bf16
    products) are within two bf16 roundings of their largest value. Rerun without autocast, the
    recomputed gate/up were fp32 and those gradients 1.7% off."""
    gm, batch, blocks = llama

    def step(module):
        module.zero_grad(set_to_none=True)  # the graphs share the fixture's parameters
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    loss, grads = step(gm)
    for lever in CHUNKED:
        got_loss, got = step(with_decisions(gm, dict.fromkeys(blocks, lever), REALISE))
        assert torch.equal(got_loss, loss)
        for name, grad in grads.items():
            if ".mlp." in name:
                torch.testing.assert_close(got[name], grad, rtol=0, atol=2 ** -7 * grad.abs().max().item())
            else:
                assert torch.equal(got[name], grad), (lever, name)


@pytest.mark.parametrize("lever", [Decision.RECOMPUTE, Decision.OFFLOAD_CHECKPOINT, Decision.OFFLOAD_MINI_SEQUENCE])
def test_a_recomputed_block_draws_its_forwards_dropout_masks(lever, monkeypatch):
    """Attention dropout 0.3, every block recomputed (its input through host copies where
    offloaded): the recomputation restores the RNG state, so the loss and every lora_B grad are
    the unplanned step's bits under the same seed (other masks would change the grads; a chunked
    MLP's own lora_B grads are sums over chunks, equal up to rounding, as above)."""
    monkeypatch.setattr(_offload, "MIN_BYTES", 0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=96, max_position_embeddings=64, attention_dropout=0.3))
    batch = make_batch("llama", 2, 16)
    gm = transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(r=8))
    gm.train()
    loss, grads = lora_B_loss_and_grads(gm, gm, batch)
    grads = [g.clone() for g in grads]
    planned = with_decisions(gm, dict.fromkeys(block_ranges(gm.graph), lever), REALISE)
    gm.zero_grad(set_to_none=True)  # the planned graph shares gm's parameters
    got_loss, got = lora_B_loss_and_grads(planned, gm, batch)
    assert torch.equal(got_loss, loss)
    for adapter, g, r in zip(gm.lorafa.adapters, got, grads, strict=True):
        if lever in CHUNKED and ".mlp." in adapter.path:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(g, r), adapter.path


@pytest.mark.parametrize("lever", [Decision.KEEP, Decision.RECOMPUTE, *LEVERS])
def test_predicted_peak_is_within_5pct_of_the_measured_one_with_each_lever(llama, lever):
    """Reference: MemTracker's peak of a real AdamW step (weights, optimizer states, batch and
    activations). These tensors are under MIN_BYTES: the offloading levers run their
    checkpoints and regions, not their copies (host memory is this CPU's: what a copy moves
    stays in the measurement)."""
    gm, batch, blocks = llama
    decisions = dict.fromkeys(blocks, lever)
    predicted = CostModel(batch, realise=REALISE)(gm, decisions).peak
    assert predicted == pytest.approx(_measured_peak(gm, decisions, batch), rel=0.05)


@pytest.mark.parametrize("offloaded, checkpointed", [(Decision.OFFLOAD_CHECKPOINT, Decision.RECOMPUTE),
                                                      (Decision.OFFLOAD_MINI_SEQUENCE, Decision.MINI_SEQUENCE)])
def test_an_offloaded_checkpoint_holds_what_a_checkpoint_holds(llama, offloaded, checkpointed):
    """Its tensors under MIN_BYTES, nothing moves: the offloaded checkpoint's measured peak is the
    on-device checkpoint's, to the byte. A reentrant checkpoint would also hold, through each
    block's backward, the block's recomputed output and its output's gradient (the floor's peak
    is one such backward: two b·s·d tensors more)."""
    gm, batch, blocks = llama
    assert _measured_peak(gm, dict.fromkeys(blocks, offloaded), batch) == \
        _measured_peak(gm, dict.fromkeys(blocks, checkpointed), batch)


def test_an_offloaded_mini_sequence_block_is_fetched_at_the_next_ones_prefetch_point(llama, monkeypatch):
    """Every block `OFFLOAD_MINI_SEQUENCE` (its input not fetched when the next block's backward
    starts, where the floor's peak allows no second input): backward fetches it at the next
    block's prefetch point, past that block's attention backward. Reference: when backward
    first needs a block's input, it is already on its way for every block but the first one
    backward reaches, and it is fetched after that block's attention's backward began."""
    monkeypatch.setattr(_offload, "MIN_BYTES", 0)
    gm, batch, blocks = llama
    planned = with_decisions(gm, dict.fromkeys(blocks, Decision.OFFLOAD_MINI_SEQUENCE), REALISE)
    events = []
    unpack, fetch_ahead = _offload.Offloader.unpack, _offload.Offloader.fetch_ahead

    def first_use(self, saved):
        region = saved.regions[saved.region] if isinstance(saved, _offload._Saved) else None
        if region is not None and not region.started:
            events.append(("needed", saved.region, all(s.fetched is not None for s in region.stored)))
        return unpack(self, saved)

    def attention_backward(module, grad_input, grad_output):
        events.append(("attention backward", None, None))

    monkeypatch.setattr(_offload.Offloader, "unpack", first_use)
    monkeypatch.setattr(_offload.Offloader, "fetch_ahead",
                        lambda self, position: (events.append(("point", position, None)), fetch_ahead(self, position)))
    for module in planned.modules():
        if type(module).__name__ == "SDPAttention":
            module.register_full_backward_hook(attention_backward)
    planned(**batch).loss.backward()
    last = len(blocks) - 1
    assert [e for e in events if e[0] == "needed"] == [("needed", last - i, i > 0) for i in range(len(blocks))]
    points = [i for i, e in enumerate(events) if e[0] == "point"]
    assert [events[i][1] for i in points] == list(range(last, -1, -1))
    assert all(events[i - 1][0] == "attention backward" for i in points)


def _measured_peak(gm, decisions, batch) -> int:
    """MemTracker's peak of the second AdamW step of `gm` with `decisions` (a copy: it trains)."""
    return adamw_peak(copy.deepcopy(with_decisions(gm, decisions, REALISE)), batch)


def test_mini_sequence_chunks_shrink_a_recomputed_blocks_transient(monkeypatch):
    """A wide MLP (intermediate 8x hidden): the recomputed block's backward holds its MLP's
    b·s·intermediate tensors a chunk at a time. Reference: the simulated step with the block
    recomputed whole, and the measured peaks (falling with the chunk count, as predicted)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=96, max_position_embeddings=256))
    batch = make_batch("llama", 2, 128)
    gm = transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(r=8))
    blocks = list(block_ranges(gm.graph))
    whole = CostModel(batch, realise=REALISE)(gm, dict.fromkeys(blocks, Decision.RECOMPUTE)).peak
    predicted, measured = [], []
    for chunks in (2, 4, 8):
        monkeypatch.setattr(recompute_regions, "MINI_SEQUENCE_CHUNKS", chunks)
        decisions = dict.fromkeys(blocks, Decision.MINI_SEQUENCE)
        predicted.append(CostModel(batch, realise=REALISE)(gm, decisions).peak)
        measured.append(_measured_peak(gm, decisions, batch))
    assert whole > predicted[0] > predicted[1] > predicted[2]
    assert measured[0] > measured[1] > measured[2]
    # The b·s·intermediate fp32 tensors of a SwiGLU MLP's backward: gate, up, their gradients.
    assert whole - predicted[2] >= 4 * 2 * 128 * 512 * 4 * (1 - 1 / 8)


def test_a_chunked_forward_holds_its_whole_outputs_and_one_chunks_not_every_chunks():
    """A `MiniSequence` region with two outputs the size of its input x (an offloaded-selective
    MLP returns its output and the kept up output), in 8 chunks. Reference, worked by hand: its
    forward holds x, the two whole outputs and about one chunk's two outputs (3 x + 2/8 x, a
    chunk-sized temporary aside); concatenating the chunks at the end held every chunk's outputs
    beside the whole ones (5 x, measured 5 x before)."""
    from lorafa_fx.measure import measure_peak_bytes
    from lorafa_fx.ops.regions import MiniSequence

    def region(x):
        return x * 2, x * 3

    mini = MiniSequence(torch.fx.symbolic_trace(region), chunks=8, split=(0,))
    x = torch.randn(1, 64, 256, requires_grad=True)
    kept = []
    peak = measure_peak_bytes(lambda: kept.append(mini(x)), x)
    assert torch.equal(kept[0][0], x * 2)
    assert 3 * x.nbytes + 2 * x.nbytes // 8 <= peak <= 3 * x.nbytes + 3 * x.nbytes // 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunked_backwards_are_the_whole_ones_bits_and_hold_less(dtype, monkeypatch):
    """The lean RMSNorm's and gated activation's backward a few rows at a time (`ops/rows.py`).
    Reference: the same step with chunks larger than the tensors (one call), bit for bit; and
    the simulated peak, lower when chunked."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=96, max_position_embeddings=128)).to(dtype)
    batch = make_batch("llama", 2, 64)
    gm = transform(model, example_inputs=batch, config=lorafa_fx.LoraFAConfig(r=8))
    loss, grads = step_grads(gm, batch)
    peak = CostModel(batch)(gm).peak
    monkeypatch.setattr(rows, "CHUNK_BYTES", 2048)
    got_loss, got = step_grads(gm, batch)
    assert torch.equal(got_loss, loss) and all(torch.equal(got[n], g) for n, g in grads.items())
    assert CostModel(batch)(gm).peak < peak


def test_planner_trades_gate_recomputation_for_link_time_when_the_link_is_busy():
    """Llama-2-7B's layers (fake weights), 8 of them, 4 x 1024 tokens, on the H100 profile, at 80% of
    the unplanned peak: the link cannot carry every offloaded block's bytes behind the forward,
    so some blocks are offloaded with their gate recomputed (`Decision.OFFLOAD_SELECTIVE`: the up
    matmul's output is offloaded too). Reference: what those blocks recompute, worked by hand
    (FlopCounterMode's convention: each block's gate matmul and both adapters' two products, gate's
    and up's, 2·tokens·in·out FLOPs each)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                         vocab_size=1000, max_position_embeddings=1024)
    lora = lorafa_fx.LoraFAConfig(r=8, chunked_cross_entropy=False)

    def plan(budget=None):
        return lorafa_fx.estimate(config, batch_size=4, seq_len=1024, budget=budget, config=lora,
                                  plan=lorafa_fx.PlanConfig(mixed_precision="bf16", device="h100"))

    unplanned = plan()
    planned = plan(int(unplanned.predicted_peak_bytes * 0.8))
    chosen = [b for b, d in planned.recompute_by_block.items() if d is Decision.OFFLOAD_SELECTIVE]
    assert chosen and planned.fits
    assert set(planned.recompute_by_block.values()) <= {Decision.OFFLOAD_SELECTIVE, Decision.OFFLOAD_MLP,
                                                         Decision.OFFLOAD, Decision.KEEP}
    tokens, hidden, intermediate, r = 4 * 1024, 4096, 11008, 8
    gate, adapter = 2 * tokens * hidden * intermediate, 2 * tokens * (hidden * r + r * intermediate)
    assert planned.recompute_flops == len(chosen) * (gate + 2 * adapter)
