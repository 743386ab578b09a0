"""Trainer's evaluate and predict (compute_metrics, predict_with_generate) on the transformed module
report what they report for PEFT LoRA with the same A (frozen), B and head."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_batch, peft_reference, randomize_lora_B, transformed


class _Rows(torch.utils.data.Dataset):
    """Rows of a batch, plus a column the model does not take (Trainer drops it)."""

    def __init__(self, batch: dict[str, torch.Tensor], drop: tuple[str, ...] = ()):
        n = len(batch["input_ids"])
        self.rows = [{k: v[i] for k, v in batch.items() if k not in drop} | {"row_id": i} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _next_token_accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1)[:, :-1] == p.label_ids[:, 1:]).mean())}


def _class_accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def _generated_token_accuracy(p):
    # Generated tokens start with the decoder's start token; both sides are padded (each to its own length).
    n = min(p.predictions.shape[1] - 1, p.label_ids.shape[1])
    return {"accuracy": float((p.predictions[:, 1 : n + 1] == p.label_ids[:, :n]).mean())}


def _trainer(module, tmp_path, compute_metrics, seq2seq=False):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=3,
                  disable_tqdm=True, dataloader_num_workers=0)
    if seq2seq:
        args = Seq2SeqTrainingArguments(**common, predict_with_generate=True, generation_max_length=6)
        return Seq2SeqTrainer(model=module, args=args, compute_metrics=compute_metrics)
    return Trainer(model=module, args=TrainingArguments(**common), compute_metrics=compute_metrics)


@pytest.mark.parametrize("name, metric", [("llama", _next_token_accuracy), ("roberta", _class_accuracy)])
def test_evaluate_and_predict_report_peft_metrics(name, metric, tmp_path):
    """evaluate (labels: the captured call) and predict without labels (another call). Reference: the same
    Trainer calls on PEFT with the same A, B and head: the same loss, metric (from the logits) and predictions."""
    model, gm = transformed(name)
    randomize_lora_B(gm)
    ref = peft_reference(model, gm)
    batch = make_batch(name, 6, 12, seed=11)
    results = []
    for module in (gm, ref):
        with warnings.catch_warnings(action="ignore"):
            trainer = _trainer(module, tmp_path / str(len(results)), metric)
            metrics = trainer.evaluate(_Rows(batch))
            predicted = trainer.predict(_Rows(batch, drop=("labels",)))
        results.append((metrics, predicted))
    (metrics, predicted), (want, want_predicted) = results
    assert metrics["eval_accuracy"] == want["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5)
    assert predicted.label_ids is None and predicted.predictions.shape == want_predicted.predictions.shape
    np.testing.assert_allclose(predicted.predictions, want_predicted.predictions, atol=2e-5, rtol=0)


def test_seq2seq_predict_with_generate_equals_peft(tmp_path):
    """Seq2SeqTrainer(predict_with_generate=True) on T5: gm.generate. Reference: the same trainer on PEFT with
    the same A and B: the same generated tokens, loss and token accuracy."""
    model, gm = transformed("t5")
    randomize_lora_B(gm, scale=1.0)
    ref = peft_reference(model, gm)
    batch = make_batch("t5", 6, 8, seed=12)
    results = []
    for module in (gm, ref):
        with warnings.catch_warnings(action="ignore"):
            trainer = _trainer(module, tmp_path / str(len(results)), _generated_token_accuracy, seq2seq=True)
            results.append(trainer.predict(_Rows(batch)))
    got, want = results
    assert got.predictions.shape == want.predictions.shape and (got.predictions != 0).any()
    np.testing.assert_array_equal(got.predictions, want.predictions)
    assert got.metrics["test_loss"] == pytest.approx(want.metrics["test_loss"], abs=1e-5)
    assert got.metrics["test_accuracy"] == want.metrics["test_accuracy"]
