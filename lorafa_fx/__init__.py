"""lorafa_fx: LoRA-FA fine-tuning of Hugging Face models as an FX graph transformation.

``gm = lorafa_fx.transform(model, example_inputs=batch)`` captures the model with
`torch.export`, adds a frozen-A / trainable-B adapter to its linears and returns a
`torch.fx.GraphModule` that trains in eager mode and under `torch.compile`.
"""

from .adapter_io import AdapterMismatchError, load_adapter, merge, save_adapter
from .config import LoraFAConfig
from .errors import (
    AlreadyTransformedError,
    CaptureError,
    DistributedPlanError,
    InfeasibleBudgetError,
    LoraFAError,
    TargetNotFoundError,
)
from .estimate import estimate
from .optim import LoraFAOptimizer, create_lorafa_optimizer
from .plan import LayerPlan, MemoryPlan
from .targets import Adapter
from .transform import transform

__all__ = [
    "Adapter",
    "AdapterMismatchError",
    "AlreadyTransformedError",
    "CaptureError",
    "DistributedPlanError",
    "InfeasibleBudgetError",
    "LayerPlan",
    "LoraFAConfig",
    "LoraFAError",
    "LoraFAOptimizer",
    "MemoryPlan",
    "TargetNotFoundError",
    "create_lorafa_optimizer",
    "estimate",
    "load_adapter",
    "merge",
    "save_adapter",
    "transform",
]
