"""TRL's DPOTrainer trains the transformed module (SFTTrainer: tests/test_trainer.py).

The recipe: ``DPOTrainer(model=gm, ref_model=model, ...)`` with the original model as the
reference. LoRA-FA trains only gm's adapters and its copies of ``modules_to_save``, so the model
it was transformed from stays the frozen base: PEFT's reference (its adapter disabled), without
a copy of the weights. ``DPOConfig(activation_checkpointing=False)``: gm refuses activation
checkpointing (a memory budget plans recomputation instead).

Reference: DPOTrainer on PEFT LoRA with A frozen (same A, B from zero: PEFT's reference is the
adapter-disabled model), same data and arguments.
"""

from __future__ import annotations

import warnings

import torch
from conftest import VOCAB, make_batch, make_model, peft_lora_B, peft_reference, transform, word_tokenizer

from lorafa_fx import LoraFAConfig

STEPS = 3


def _rows(n: int = 8) -> dict[str, list[str]]:
    """Preference rows over the word tokenizer: a prompt, then chosen/rejected completions that end
    with eos (so DPOTrainer appends none) and start with a space (the prompt's tokens stay a prefix)."""
    g = torch.Generator().manual_seed(4)

    def words(k: int) -> str:
        return " ".join(f"t{i}" for i in torch.randint(2, VOCAB, (k,), generator=g).tolist())

    return {"prompt": [words(5) for _ in range(n)], "chosen": [f" {words(4)} t1" for _ in range(n)],
            "rejected": [f" {words(3)} t1" for _ in range(n)]}


def test_dpo_trainer_trains_like_peft(tmp_path):
    """3 DPO steps (fp32, CPU, batch 2). Reference: PEFT LoRA with A frozen under the same
    DPOTrainer: the same logged losses and final lora_B, moved; the original model is unchanged."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = make_model("llama")
    gm = transform(model, example_inputs=make_batch("llama", 2, 12), config=LoraFAConfig(r=4))
    ref = peft_reference(model, gm)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def train(module, out, ref_model):
        args = DPOConfig(output_dir=str(out), report_to=[], use_cpu=True, max_steps=STEPS, activation_checkpointing=False,
                         per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
                         logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
        with warnings.catch_warnings(action="ignore"):
            trainer = DPOTrainer(model=module, ref_model=ref_model, args=args, processing_class=word_tokenizer(),
                                 train_dataset=Dataset.from_dict(_rows()))
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    losses = train(gm, tmp_path / "gm", model)
    ref_losses = train(ref, tmp_path / "peft", None)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for a in gm.lorafa.adapters:
        b = gm.get_parameter(f"{a.path}.lora_B.weight")
        assert b.abs().max() > 1e-3, a.path
        torch.testing.assert_close(b, peft_lora_B(ref, a.path), rtol=1e-5, atol=1e-7, msg=a.path)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
