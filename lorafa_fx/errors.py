"""The library's exceptions: each message names the problem and the fix."""

from __future__ import annotations


class LoraFAError(Exception):
    """Base class of every error lorafa_fx raises on purpose."""


class TargetNotFoundError(LoraFAError, ValueError):
    """A `target_modules` / `modules_to_save` pattern matched no module of the model."""


class CaptureError(LoraFAError, RuntimeError):
    """`torch.export` could not capture the model."""


class AlreadyTransformedError(LoraFAError, TypeError):
    """`transform` was given a module that `transform` already produced."""
