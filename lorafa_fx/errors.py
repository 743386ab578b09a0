"""The library's exceptions, all of them: each message names the problem and the fix."""

from __future__ import annotations

from .units import format_bytes


class LoraFAError(Exception):
    """Base class of every error lorafa_fx raises on purpose."""


class ConfigError(LoraFAError, ValueError):
    """A `LoraFAConfig` field (or another argument) has a value that cannot mean what was asked."""


class TargetNotFoundError(LoraFAError, ValueError):
    """A `target_modules` / `modules_to_save` pattern matched no module of the model."""


class CaptureError(LoraFAError, RuntimeError):
    """`torch.export` could not capture the model."""


class AlreadyTransformedError(LoraFAError, TypeError):
    """`transform` was given a module that `transform` already produced."""


class InfeasibleBudgetError(LoraFAError, ValueError):
    """No plan fits the budget. ``min_budget_bytes`` is the smallest budget that does."""

    def __init__(
        self,
        min_budget_bytes: int,
        what_takes_memory: str,
        budget_bytes: int,
        shape: str = "this batch",
        fix: str = "lower the batch size, sequence length or rank",
    ) -> None:
        self.min_budget_bytes = min_budget_bytes
        self.what_takes_memory = what_takes_memory
        self.budget_bytes = budget_bytes
        super().__init__(
            f"budget {format_bytes(budget_bytes)} cannot be met: the smallest feasible budget for {shape} "
            f"is {format_bytes(min_budget_bytes)} ({min_budget_bytes} bytes, the least any plan keeps). "
            f"At that peak the memory goes to: {what_takes_memory}. Pass budget >= {min_budget_bytes}, or {fix}."
        )


class DistributedPlanError(LoraFAError, ValueError):
    """A data-parallel plan or wrap cannot be made as asked (world size, sharding, process group)."""


class OutlineError(LoraFAError, ValueError):
    """A layer's nodes or parameters cannot be separated from the rest of the graph."""


class AdapterMismatchError(LoraFAError, ValueError):
    """A saved adapter does not fit the transformed model (targets, shapes, rank or scaling)."""


class AdapterFileError(LoraFAError, ValueError):
    """An adapter directory's files cannot be read (missing, truncated, not PEFT's format)."""


class ExampleInputsError(LoraFAError, ValueError):
    """`example_inputs` holds a key the model's forward does not take, or a flag capture refuses."""


class InputShapeError(LoraFAError, ValueError):
    """A batch's shape is outside what the module was captured for (e.g. longer than the position limit)."""
