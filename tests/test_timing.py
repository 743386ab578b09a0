"""The step-time model (memory/timing.py, memory/report.py) against figures worked by hand.

Reference: the arithmetic in each docstring, done on paper from the stated example (not the
model's formula typed again), and the datasheet figures of `devices.PROFILES`.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

import lorafa_fx
from lorafa_fx.devices import PROFILES
from lorafa_fx.memory.timing import BlockTime, transfer_wait
from lorafa_fx.ops.offload import COPIES_IN_FLIGHT

MS = 1e-3


def test_three_offloaded_blocks_wait_for_the_link_as_worked_by_hand():
    """Three blocks of 10 ms forward and 10 ms backward, each offloading 15 ms of transfer.
    Forward: block 0 runs 0-10, its copy 10-25; block 1 runs 10-20, its copy 25-40; block 2
    waits for block 0's copy (two copies in flight), 5 ms, runs 25-35, its copy 40-55; it is the
    last offloaded block, so compute waits for that copy: 20 ms. Backward (t from its start):
    block 2 fetches itself (0-15) and prefetches block 1 (15-30); it waits 15, runs 15-25. Block
    1 waits for 30 (5 ms), prefetches block 0 (30-45), runs 30-40. Block 0 waits for 45 (5 ms).
    Total: 5 + 20 + 15 + 5 + 5 = 50 ms."""
    blocks = [BlockTime(10 * MS, 10 * MS, 15 * MS)] * 3
    assert transfer_wait(blocks) == pytest.approx(50 * MS)


def test_a_block_waits_for_the_copy_two_offloaded_blocks_before_it():
    """Three offloaded blocks of 10 ms forward and backward; block 0's copy takes 30 ms, blocks
    1 and 2's 1 ms. Forward: block 0 runs 0-10, its copy 10-40; block 1 runs 10-20, its copy
    40-41; block 2 may start only when block 0's copy is done (at 40: it waits 20 ms, where
    without the bound it would start at 20), runs 40-50, its copy 50-51: compute waits 1 ms
    more for it. Backward: block 2 fetches itself (0-1) and block 1 (1-2), waits 1, runs 1-11;
    block 1 is ready, fetches block 0 from 11 (to 41), runs 11-21; block 0 waits 20.
    Total: 20 + 1 + 1 + 20 = 42 ms."""
    assert COPIES_IN_FLIGHT == 2  # the bound the arithmetic above follows
    blocks = [BlockTime(10 * MS, 10 * MS, 30 * MS), BlockTime(10 * MS, 10 * MS, 1 * MS),
              BlockTime(10 * MS, 10 * MS, 1 * MS)]
    assert transfer_wait(blocks) == pytest.approx(42 * MS)


def test_blocks_fetched_only_when_needed_wait_for_each_fetch_whole():
    """The same three blocks as the first test, none prefetched (the floor's offloaded
    mini-sequence blocks): forward as before (25 ms). Backward: block 2 fetches 0-15 and runs
    15-25; block 1 fetches 25-40 and runs 40-50; block 0 fetches 50-65. Each waits its 15 ms:
    25 + 45 = 70 ms."""
    blocks = [BlockTime(10 * MS, 10 * MS, 15 * MS, prefetched=False)] * 3
    assert transfer_wait(blocks) == pytest.approx(70 * MS)


def test_a_prefetch_point_fetches_the_previous_block_that_long_before_its_backward_ends():
    """The same three blocks, none prefetched, each with a prefetch point 4 ms before its
    backward's end: forward as before (25 ms). Backward: block 2 fetches 0-15 (waits 15) and
    runs 15-25; at 21 it fetches block 1 (21-36): block 1 waits 11 and runs 36-46; at 42 it
    fetches block 0 (42-57): block 0 waits 11. 25 + 15 + 11 + 11 = 62 ms."""
    blocks = [BlockTime(10 * MS, 10 * MS, 15 * MS, prefetched=False, lead=4 * MS)] * 3
    assert transfer_wait(blocks) == pytest.approx(62 * MS)


def test_forward_waits_for_every_copy_after_the_last_offloaded_block():
    """Block 0 offloads 15 ms of copies; three kept blocks of 10 ms follow it. Forward: the copy
    runs 10-25 ms, and compute waits for it after block 0 (its device memory is freed then):
    15 ms. Backward: the kept blocks run 0-30 ms, but the fetch starts only when backward
    reaches block 0 (at 30 ms) and takes 15: it waits 15 ms. Total 30 ms."""
    blocks = [BlockTime(10 * MS, 10 * MS, 15 * MS)] + [BlockTime(10 * MS, 10 * MS)] * 3
    assert transfer_wait(blocks) == pytest.approx(30 * MS)
    # Two offloaded blocks (0 and 2) with a kept one between: forward copies 10-25 and 30-45
    # (block 2 runs 20-30 and is the last: compute waits 15 ms). Backward: block 3 runs 0-10;
    # block 2 fetches itself (10-25) and block 0 (25-40), waits 15, runs 25-35; block 1 runs
    # 35-45; block 0 is ready at 40. Total 15 + 15 = 30 ms.
    blocks[2] = blocks[0]
    assert transfer_wait(blocks) == pytest.approx(30 * MS)


def test_copies_start_when_each_tensor_is_saved_as_worked_by_hand():
    """Two offloaded blocks of 10 ms forward and backward. Each saves a tensor of 4 ms of copy
    2 ms into its forward and another 8 ms in: on an idle link its copies run 2-6 and 8-12,
    done 12 ms after its forward starts (`mix.Block.copied`, from the block's FLOPs and bytes at
    1 TFLOP/s over 1 GB/s). Forward: block 0 runs 0-10, its copies 2-6 and 8-12; block 1 runs
    10-20, its copies 12-16 and 18-22; it is the last offloaded block: compute waits 2 ms.
    Backward: block 1 fetches itself (0-8) and block 0 (8-16), waits 8, runs 8-18; block 0 is
    ready at 16. Total 10 ms; copied whole when each forward ends (10-18, 20-28) it would be 16.
    An offloaded-selective block sends its other saves as they come and its MLP's span (its
    input and kept up output, 3 ms here) when the span ends, 9 ms in: done at max(2 + 4 + 3,
    9 + 3) = 12 ms."""
    from lorafa_fx.choices import Decision
    from lorafa_fx.memory.mix import Block

    block = Block(saved=8_000_000, input=1, selective=4_000_000, forward=10 * 10**9, backward=10 * 10**9,
                  selective_flops=1, chunked_flops=0, chunkable=True, selective_chunkable=True, kept=3_000_000,
                  saves=((2 * 10**9, 4_000_000, False), (8 * 10**9, 4_000_000, True)), selective_end=9 * 10**9)
    assert block.copied(Decision.OFFLOAD, 1e12, 1e9) == pytest.approx(12 * MS)
    assert block.copied(Decision.OFFLOAD_SELECTIVE, 1e12, 1e9) == pytest.approx(12 * MS)
    blocks = [BlockTime(10 * MS, 10 * MS, 8 * MS, copied=12 * MS)] * 2
    assert transfer_wait(blocks) == pytest.approx(10 * MS)
    assert transfer_wait([BlockTime(10 * MS, 10 * MS, 8 * MS)] * 2) == pytest.approx(16 * MS)
    # Copies done (at 4 ms) before the forward ends (10 ms) hold nothing up; backward waits for the fetch.
    assert transfer_wait([BlockTime(10 * MS, 10 * MS, 2 * MS, copied=4 * MS)]) == pytest.approx(2 * MS)


def test_the_plan_states_its_time_model_and_the_step_time_is_its_flops_plus_waits():
    """A Llama step planned for an H100 with every block offloaded or recomputed. Reference:
    the printout's stated assumptions are the profile's figures (989 TFLOP/s at 40%, 64 GB/s),
    and the step's seconds are (forward + backward + recomputed FLOPs) / (989e12 * 0.4) plus the
    link waits the plan reports."""
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                         vocab_size=1000, max_position_embeddings=1024)
    lora = lorafa_fx.LoraFAConfig(r=8, chunked_cross_entropy=False)
    h100 = lorafa_fx.PlanConfig(device="h100")
    unplanned = lorafa_fx.estimate(config, batch_size=8, seq_len=1024, config=lora, plan=h100)
    plan = lorafa_fx.estimate(config, batch_size=8, seq_len=1024, config=lora, plan=h100,
                              budget=int(unplanned.predicted_peak_bytes * 0.7))
    printed = " ".join(str(plan).split())
    assert "40% of 989 TFLOP/s" in printed and "host link 64 GB/s each way" in printed
    assert PROFILES["h100"].dense_bf16_flops == 989e12 and PROFILES["h100"].host_link_bytes_per_s == 64e9
    assert plan.step_seconds == pytest.approx((plan.step_flops + plan.recompute_flops) / (989e12 * 0.4)
                                              + plan.offload_seconds)
    assert plan.overhead_pct == pytest.approx(100 * (plan.step_seconds / unplanned.step_seconds - 1))
