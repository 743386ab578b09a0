"""Mixture-of-experts adapters in a data-parallel job (distributed.py): FSDP2 (expert stacks and
their adapters sharded like any parameter) and DDP with the LoRA-FA optimizer, 2 CPU processes,
Mixtral from `lorafa_fx.zoo`.

Reference: one process training the same steps on the concatenated batch (tests/_dist_worker.py's
setup, as tests/test_distributed.py checks for Llama).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_batch, make_model, randomize_lora_B, transform
from test_distributed import _launch

import lorafa_fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _single_process(lorafa_optimizer: bool) -> dict[str, torch.Tensor]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _dist_worker import GLOBAL_BATCH, LR, SEQ, STEPS, R

    batch = make_batch("mixtral", GLOBAL_BATCH, SEQ, seed=3)
    gm = transform(make_model("mixtral"), example_inputs=batch, config=lorafa_fx.LoraFAConfig(r=R))
    randomize_lora_B(gm)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = lorafa_fx.create_lorafa_optimizer(gm, lr=LR) if lorafa_optimizer else torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        gm(**batch).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_fsdp2_and_ddp_train_expert_adapters_as_one_process(tmp_path):
    """Reference: one process on the global batch: every lora_B (experts' and router's too) after
    5 AdamW steps with FSDP2, and 5 LoRA-FA optimizer steps with DDP; frozen weights unchanged."""
    ranks = _launch(tmp_path, ["full", "none_lorafaopt"], "--model", "mixtral")
    for run, lorafa_optimizer in (("full", False), ("none_lorafaopt", True)):
        expected = _single_process(lorafa_optimizer)
        assert any("experts" in n for n in expected)
        for rank in range(2):
            result = ranks[(run, rank)]
            assert result["frozen_drift"] == 0 and not result["frozen_grads"]
            assert sorted(result["lora_B"]) == sorted(expected)
            for n, b in result["lora_B"].items():
                torch.testing.assert_close(b, expected[n], atol=1e-5, rtol=1e-4, msg=f"{run} rank {rank}: {n}")
