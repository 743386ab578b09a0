"""The embedded default job (python -m lorafa_fx demo) really trains."""

from rich.console import Console

from lorafa_fx import demo


def test_demo_loss_falls_below_the_unigram_floor():
    """Reference: ln(256) = 5.55 at init; learning the 32-token sub-vocabulary alone gives ln(32) = 3.47."""
    losses = demo.run(steps=30, batch=8, seq=32, console=Console(quiet=True))
    assert losses[0] > 5.0
    assert min(losses[-5:]) < 3.47
