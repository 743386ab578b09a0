"""hf_compat: HF Trainer and accelerate train the GraphModule like PEFT LoRA with A frozen."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_batch, make_model, peft_lora_B, peft_reference, randomize_lora_B, transform, word_tokenizer
from safetensors.torch import load_file

from lorafa_fx import LoraFAConfig
from lorafa_fx.errors import LoraFAError
from lorafa_fx.hf_compat import attach_hf_attributes

SEQ = 12
STEPS = 5


def _transform(name="llama", model=None):
    model = model if model is not None else make_model(name)
    gm = transform(model, example_inputs=make_batch(name, 2, SEQ),
                             config=LoraFAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn"]
                                                 if name != "llama" else ["q_proj", "v_proj", "down_proj"]))
    if not hasattr(gm, "accepts_loss_kwargs"):  # until transform attaches them itself
        attach_hf_attributes(gm, model)
    return model, gm


class _Rows(torch.utils.data.Dataset):
    """8 fixed next-token rows, plus a column the model does not take (Trainer must drop it)."""

    def __init__(self, name="llama"):
        b = make_batch(name, 8, SEQ, seed=4)
        self.rows = [{k: v[i] for k, v in b.items()} | {"row_id": i} for i in range(8)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(model, tmp_path, batch=2, accumulation=2, steps=STEPS, **extra):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0, **extra)
    with warnings.catch_warnings(action="ignore"):
        trainer = Trainer(model=model, args=args, train_dataset=_Rows())
        trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_matches_peft_with_gradient_accumulation(tmp_path):
    """Reference: Trainer on PEFT LoRA with the same A (frozen) and B, same args (batch 2 x 2
    accumulation steps): same logged losses and final lora_B; one batch of 4 gives the same
    lora_B (the mean of two equal-size micro-batch means is the batch mean)."""
    model, gm = _transform()
    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    _, gm4 = _transform(model=make_model("llama"))
    with torch.no_grad():
        for p, q in zip(gm4.parameters(), gm.parameters()):
            p.copy_(q)

    _, losses = _train(gm, tmp_path / "gm")
    _, ref_losses = _train(ref, tmp_path / "peft")
    _, losses4 = _train(gm4, tmp_path / "gm4", batch=4, accumulation=1)

    assert len(losses) == STEPS and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(losses4), torch.tensor(losses), atol=1e-5, rtol=0)
    for a in gm.lorafa.adapters:
        b = gm.get_parameter(f"{a.path}.lora_B.weight")
        torch.testing.assert_close(b, peft_lora_B(ref, a.path), atol=1e-5, rtol=0)
        torch.testing.assert_close(gm4.get_parameter(f"{a.path}.lora_B.weight"), b, atol=1e-5, rtol=0)


def test_trainer_checkpoint_is_the_adapter(tmp_path):
    """Reference: the trained gm — Trainer.save_model writes its lora_A/lora_B only (GPT-2's tied
    wte/lm_head would make a full state dict unsavable); a fresh transform loading that file with
    strict=True computes gm's logits; gm.save_pretrained writes an adapter PEFT loads to them too."""
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    model, gm = _transform("gpt2")
    randomize_lora_B(gm)
    trainer = Trainer(model=gm, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "ckpt"))
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert set(saved) == {f"{a.path}.lora_{x}.weight" for a in gm.lorafa.adapters for x in "AB"}

    batch = make_batch("gpt2", 3, 9, seed=7)
    gm.eval()
    expected = gm(**batch).logits
    _, fresh = _transform("gpt2", model=make_model("gpt2"))
    fresh.load_state_dict(saved, strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=0, rtol=0)

    gm.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings(action="ignore"):
        peft_model = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_model(**batch).logits, expected, atol=2e-5, rtol=0)


def test_accelerate_prepare_trains_like_peft():
    """Reference: the same 5 AdamW steps on PEFT LoRA (A frozen, same A/B) in a plain PyTorch
    loop: same losses, falling."""
    from accelerate import Accelerator

    model, gm = _transform()
    ref = peft_reference(model, gm)
    loader = torch.utils.data.DataLoader([{k: v for k, v in r.items() if k != "row_id"} for r in _Rows().rows],
                                         batch_size=4, shuffle=False)

    def run(module, prepare):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        module, opt, dl = prepare(module, opt, loader)
        losses = []
        for step in range(STEPS):
            batch = list(dl)[step % 2]
            loss = module(**batch).loss
            (accelerator.backward(loss) if prepare is accelerator.prepare else loss.backward())
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    accelerator = Accelerator(cpu=True)
    losses = run(gm, accelerator.prepare)
    ref_losses = run(ref, lambda *xs: xs)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)


def test_model_attributes_trainer_reads():
    """Reference: the model's own attributes (config object, main input) and Trainer's signature
    rules (forward takes exactly the batch keys; no loss kwargs)."""
    import inspect

    model, gm = _transform()
    assert gm.config is model.config and gm.main_input_name == "input_ids"
    assert list(inspect.signature(gm.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    assert gm.accepts_loss_kwargs is False and gm.can_generate() is model.can_generate() is True
    with pytest.raises(LoraFAError, match="activation_checkpointing=False"):
        gm.activation_checkpointing_enable()


def _lora_B(module, gm, path):
    """`path`'s lora_B in `module`: `gm` itself or its PEFT reference."""
    return module.get_parameter(f"{path}.lora_B.weight") if module is gm else peft_lora_B(module, path)


def _with_reference():
    """gm with a random B, its PEFT A-frozen reference, and gm's lora_B before training."""
    model, gm = _transform()
    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    start = {a.path: gm.get_parameter(f"{a.path}.lora_B.weight").detach().clone() for a in gm.lorafa.adapters}
    return gm, ref, start


def _assert_trained_alike(gm, ref, start, losses, ref_losses):
    """3 logged losses equal to the reference's; every lora_B moved, and equal to the reference's."""
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)
    for a in gm.lorafa.adapters:
        b = gm.get_parameter(f"{a.path}.lora_B.weight")
        assert (b - start[a.path]).abs().max() > 1e-3, a.path
        torch.testing.assert_close(b, peft_lora_B(ref, a.path), rtol=1e-2, atol=1e-3, msg=a.path)


def test_trainer_bf16_matches_peft(tmp_path):
    """``Trainer(bf16=True, use_cpu=True)`` (bf16 autocast), 3 steps. Reference: PEFT LoRA with the
    same A (frozen) and B under the same Trainer: same logged losses and final lora_B, moved."""
    gm, ref, start = _with_reference()
    _, losses = _train(gm, tmp_path / "gm", accumulation=1, steps=3, bf16=True)
    _, ref_losses = _train(ref, tmp_path / "peft", accumulation=1, steps=3, bf16=True)
    _assert_trained_alike(gm, ref, start, losses, ref_losses)


def test_sft_trainer_trains_like_peft(tmp_path):
    """TRL's SFTTrainer (bf16, 3 steps) on a pre-tokenized dataset. Reference: PEFT LoRA with the
    same A (frozen) and B under the same SFTTrainer: same logged losses and final lora_B, moved."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    gm, ref, start = _with_reference()
    rows = make_batch("llama", 8, SEQ, seed=4)["input_ids"]
    tokenizer = word_tokenizer()

    def train(module, out):
        # SFTConfig switches activation checkpointing on by default; gm refuses it (a budget plans recomputation).
        args = SFTConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=True, max_steps=3,
                         activation_checkpointing=False,
                         per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
                         logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
        with warnings.catch_warnings(action="ignore"):
            trainer = SFTTrainer(model=module, args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}))
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    backbone_calls = []
    gm.base_model.register_forward_hook(lambda *_: backbone_calls.append(1))
    losses, ref_losses = train(gm, tmp_path / "gm"), train(ref, tmp_path / "peft")
    # TRL's fused LM head ran gm.base_model (the graph up to the last hidden state) and gm's output projection.
    assert len(backbone_calls) == 3
    _assert_trained_alike(gm, ref, start, losses, ref_losses)
    # The backbone is no submodule of gm: gm's checkpoint is still the adapter.
    assert set(gm.state_dict()) == {f"{a.path}.lora_{x}.weight" for a in gm.lorafa.adapters for x in "AB"}
    assert "sft" in gm.model_tags


def test_accelerate_bf16_prepare_matches_peft():
    """``Accelerator(mixed_precision="bf16", cpu=True)``: prepare + 3 AdamW steps. Reference: PEFT
    LoRA with the same A (frozen) and B through the same Accelerator: same losses and final lora_B."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, gm = _transform()
    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    loader = torch.utils.data.DataLoader([{k: v for k, v in r.items() if k != "row_id"} for r in _Rows().rows],
                                         batch_size=4, shuffle=False)
    # The process-wide state keeps the first Accelerator's precision; start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    runs = {}
    for module in (gm, ref):
        start = {a.path: _lora_B(module, gm, a.path).detach().clone() for a in gm.lorafa.adapters}
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        prepared, opt, dl = accelerator.prepare(module, opt, loader)
        losses = []
        for step in range(3):
            loss = prepared(**list(dl)[step % 2]).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        moved = {path: (_lora_B(module, gm, path) - b).abs().max().item() for path, b in start.items()}
        runs[module is gm] = losses, moved
    AcceleratorState._reset_state(reset_partial_state=True)
    (losses, moved), (ref_losses, _) = runs[True], runs[False]
    assert min(moved.values()) > 1e-3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)
    for a in gm.lorafa.adapters:
        torch.testing.assert_close(_lora_B(gm, gm, a.path), peft_lora_B(ref, a.path), rtol=1e-2, atol=1e-3,
                                   msg=a.path)


def test_deepcopy_keeps_what_trainers_read():
    """Reference: the original module. GraphModule's deepcopy rebuilds the module and drops plain
    attributes unless they are registered; EMA and TRL's reference models deep-copy the model."""
    import copy
    import inspect

    model = make_model("llama")
    batch = make_batch("llama", 2, 8)
    gm = transform(model, example_inputs=batch, config=LoraFAConfig(r=4))
    randomize_lora_B(gm)
    twin = copy.deepcopy(gm)
    assert twin.lorafa.adapters == gm.lorafa.adapters and twin.lorafa_plan == gm.lorafa_plan
    assert twin.config is not gm.config and twin.config.to_dict() == gm.config.to_dict()
    assert twin.save_pretrained.__self__ is twin and twin.base_model.root is twin
    assert list(twin.state_dict()) == list(gm.state_dict())
    # A lazy GraphModule's forward is (*args, **kwargs) until it runs; Trainer reads the signature first.
    assert list(inspect.signature(twin.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    twin_b = twin.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight")
    assert twin_b is not gm.get_parameter("model.layers.0.self_attn.q_proj.lora_B.weight")
    torch.testing.assert_close(twin(**batch).loss, gm(**batch).loss, rtol=0, atol=0)
    hidden = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.testing.assert_close(twin.base_model(**hidden).last_hidden_state, gm.base_model(**hidden).last_hidden_state)
