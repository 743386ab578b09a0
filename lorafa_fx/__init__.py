"""lorafa_fx: LoRA-FA fine-tuning of Hugging Face models as an FX graph transformation.

``gm = lorafa_fx.transform(model, example_inputs=batch)`` captures the model with
`torch.export`, adds a frozen-A / trainable-B adapter to its linears and returns a
`torch.fx.GraphModule` that trains in eager mode and under `torch.compile`.
"""

from .api import estimate, largest_batch_size, transform
from .config import LoraFAConfig
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AlreadyTransformedError,
    CaptureError,
    ConfigError,
    DistributedPlanError,
    ExampleInputsError,
    InfeasibleBudgetError,
    InputShapeError,
    LoraFAError,
    TargetNotFoundError,
)
from .memory.report import LayerPlan, MemoryPlan
from .merge import merge
from .optim import LoraFAOptimizer, create_lorafa_optimizer
from .peft_files import load_adapter, save_adapter
from .plan_config import PlanConfig
from .targets import Adapter

__all__ = [
    "Adapter",
    "AdapterFileError",
    "AdapterMismatchError",
    "AlreadyTransformedError",
    "CaptureError",
    "ConfigError",
    "DistributedPlanError",
    "ExampleInputsError",
    "InfeasibleBudgetError",
    "InputShapeError",
    "LayerPlan",
    "LoraFAConfig",
    "LoraFAError",
    "LoraFAOptimizer",
    "MemoryPlan",
    "PlanConfig",
    "TargetNotFoundError",
    "create_lorafa_optimizer",
    "estimate",
    "largest_batch_size",
    "load_adapter",
    "merge",
    "save_adapter",
    "transform",
]
