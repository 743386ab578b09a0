"""lorafa_fx: LoRA-FA fine-tuning of Hugging Face models as an FX graph transformation.

``gm = lorafa_fx.transform(model, example_inputs=batch)`` captures the model with
`torch.export`, adds a frozen-A / trainable-B adapter to its linears and returns a
`torch.fx.GraphModule` that trains in eager mode and under `torch.compile`.
"""

from .config import LoraFAConfig
from .errors import AlreadyTransformedError, CaptureError, LoraFAError, TargetNotFoundError
from .targets import Adapter
from .transform import transform

__all__ = [
    "Adapter",
    "AlreadyTransformedError",
    "CaptureError",
    "LoraFAConfig",
    "LoraFAError",
    "TargetNotFoundError",
    "transform",
]
