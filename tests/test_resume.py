"""Checkpoint and resume: a run interrupted after 3 of 6 steps and resumed from its checkpoint ends
bit for bit where the uninterrupted run ends (fp32, CPU), with the LoRA-FA optimizer
(`optim.create_lorafa_optimizer`) and a head trained in full.

References: the uninterrupted run itself: HF Trainer with ``resume_from_checkpoint`` (its
``model.safetensors`` = ``gm.state_dict()``, ``optimizer.pt``, scheduler and RNG states), and a
plain loop saving ``gm.state_dict()`` + ``optimizer.state_dict()`` + the LR scheduler's with
``torch.save`` and loading them into a fresh transform.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import make_batch, transformed

from lorafa_fx import create_lorafa_optimizer

STEPS, SEQ = 6, 12


def _fresh(name: str, head: str):
    """A new transform of the same seeded model (a copy of one capture; dropout on: RoBERTa's 0.1)
    and its optimizer."""
    _, gm = transformed(name, (2, SEQ), head=head, r=4)
    return gm, create_lorafa_optimizer(gm, lr=1e-2, weight_decay=0.01)


def _assert_same(gm, other):
    trained = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert any(".lora_B." in n for n in trained) and any(".lora_" not in n for n in trained)
    for n in trained:
        assert torch.equal(gm.get_parameter(n), other.get_parameter(n)), n


def test_trainer_resume_from_checkpoint_is_bit_exact(tmp_path):
    """RoBERTa classification (classifier trained in full, dropout drawn from the RNG Trainer
    checkpoints), batch 2, linear LR decay, LoRA-FA optimizer. Reference: the same Trainer run
    without interruption: the same parameters bit for bit and the same logged losses."""
    from transformers import Trainer, TrainingArguments

    batch = make_batch("roberta", 12, SEQ, seed=4, head="ForSequenceClassification")
    rows = [{k: v[i] for k, v in batch.items()} for i in range(12)]

    def run(out, resume=None):
        gm, opt = _fresh("roberta", "ForSequenceClassification")
        args = TrainingArguments(
            output_dir=str(out), report_to=[], use_cpu=True, max_steps=STEPS, per_device_train_batch_size=2,
            learning_rate=1e-2, lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=3,
            seed=0, disable_tqdm=True, dataloader_num_workers=0)
        with warnings.catch_warnings(action="ignore"):
            trainer = Trainer(model=gm, args=args, train_dataset=rows, optimizers=(opt, None))
            trainer.train(resume_from_checkpoint=resume)
        return gm, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    whole, losses = run(tmp_path / "whole")
    resumed, resumed_losses = run(tmp_path / "resumed", resume=tmp_path / "whole" / "checkpoint-3")
    _assert_same(whole, resumed)
    assert resumed_losses == losses and len(losses) == STEPS


def test_plain_state_dict_round_trip_is_bit_exact():
    """Llama classification (score trained in full): 3 steps, ``torch.save`` of module, optimizer
    and scheduler state, loaded with ``map_location="cpu"`` into a fresh transform and optimizer,
    3 more steps. Reference: 6 uninterrupted steps: the same parameters bit for bit; the loaded
    optimizer's state is keyed by the fresh module's own parameters."""
    head = "ForSequenceClassification"
    batches = [make_batch("llama", 2, SEQ, seed=10 + i, head=head) for i in range(STEPS)]

    def run(gm, opt, sched, steps):
        for i in steps:
            gm(**batches[i]).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    def fresh():
        gm, opt = _fresh("llama", head)
        return gm, opt, torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=STEPS)

    whole = fresh()
    run(*whole, range(STEPS))
    first = fresh()
    run(*first, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "scheduler": first[2].state_dict()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu")
    second = fresh()
    second[0].load_state_dict(checkpoint["model"])
    second[1].load_state_dict(checkpoint["optimizer"])
    second[2].load_state_dict(checkpoint["scheduler"])
    trained = {p for p in second[0].parameters() if p.requires_grad}
    assert set(second[1].state) == trained and all(s["step"] == 3 for s in second[1].state.values())
    run(*second, range(3, STEPS))
    _assert_same(whole[0], second[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_another_device():
    """3 steps on the CPU, then module and optimizer moved to CUDA (``gm.to("cuda")``: the optimizer
    states follow their parameters) and a fresh CUDA transform loading the CPU checkpoint, 3 more
    steps each. Reference: 6 CPU steps (equal within float rounding: the devices' kernels differ)."""
    head = "ForSequenceClassification"
    batches = [make_batch("llama", 2, SEQ, seed=10 + i, head=head) for i in range(STEPS)]

    def run(gm, opt, steps, device):
        for i in steps:
            gm(**{k: v.to(device) for k, v in batches[i].items()}).loss.backward()
            opt.step()
            opt.zero_grad()

    whole = _fresh("llama", head)
    run(*whole, range(STEPS), "cpu")
    moved = _fresh("llama", head)
    run(*moved, range(3), "cpu")
    checkpoint = {"model": moved[0].state_dict(), "optimizer": moved[1].state_dict()}
    moved[0].to("cuda")
    run(*moved, range(3, STEPS), "cuda")
    loaded = _fresh("llama", head)
    loaded[0].to("cuda")
    loaded[0].load_state_dict(checkpoint["model"])
    loaded[1].load_state_dict(checkpoint["optimizer"])
    run(*loaded, range(3, STEPS), "cuda")
    for n, p in whole[0].named_parameters():
        if p.requires_grad:
            for other in (moved[0], loaded[0]):
                torch.testing.assert_close(other.get_parameter(n).cpu(), p, rtol=1e-4, atol=1e-5, msg=n)
