"""How a training step is planned: `PlanConfig`, the one object `transform`, `estimate`,
`largest_batch_size` and the ``plan`` command take (the command's flags are its fields, with
the same defaults), and `PlanSettings`, the same choices resolved against a model and a device
(``budget="auto"`` read, the card to time the step on found)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .choices import Sharding, choice
from .devices import PROFILES, auto_budget, device_profile, resident_bytes, resolve_device
from .errors import ConfigError, DistributedPlanError
from .units import parse_budget

#: accelerate's names for the precision a step runs in, and the autocast dtype of each.
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _help(text: str, example: str) -> dict:
    """A field's line in ``plan --help``, and a value an error message offers as an example."""
    return {"help": text, "example": example}


@dataclass(frozen=True)
class PlanConfig:
    """How to plan one training step (AdamW) of the transformed model.

    Attributes:
        budget: memory budget of the step: bytes, a size with accelerate's units (``"40GB"`` =
            40e9, ``"40GiB"`` = 40·2^30), or ``"auto"``: the free memory of `device` minus a
            reserve (`lorafa_fx.devices.RESERVE`). The planner lowers ranks, chunks the loss and
            recomputes or offloads blocks as needed (see docs/planning.md); None: no planning,
            only the prediction.
        device: the device the step runs on. A card to plan for from here (``"a100"``,
            ``"h100"``, ``"h200"``: the plan predicts the step's time on it, may offload to host
            memory, and ``budget="auto"`` is an idle card's memory), or a local torch device
            (``"cpu"``, ``"cuda:1"``) whose free memory ``budget="auto"`` reads. Default: the
            model's device (for a config, the current CUDA device where CUDA is available).
        mixed_precision: the precision of the step, accelerate's names: ``"bf16"``, ``"fp16"``
            (forward under autocast, as ``Trainer(bf16=True)`` runs it) or ``"no"``. None: the
            autocast in force at the call.
        world_size: plan one rank of a data-parallel job of this many processes (the batch is
            then one rank's, and the budget one rank's).
        sharding: with `world_size`: ``"full"`` (FSDP2: every parameter sharded 1/world_size)
            or ``"none"`` (DDP: replicated).
        offload: whether blocks may be offloaded to host memory on a card; False: blocks that do
            not fit are recomputed instead (host or pinned memory is short).
    """

    budget: int | str | None = field(default=None, metadata=_help(
        "bytes (e.g. 40000000000), 40GB (10^9), 40GiB (2^30), or auto: the free memory of --device minus a reserve", "40GB"))
    device: str | None = field(default=None, metadata=_help(
        f"the card to plan for ({', '.join(PROFILES)}: the step is timed on it and may offload; --budget auto is its "
        "memory minus a reserve), or a local device (cpu, cuda:N) whose free memory --budget auto reads", "h100"))
    mixed_precision: str | None = field(default=None, metadata=_help(
        f"the step's forward under autocast, accelerate's names ({', '.join(MIXED_PRECISION)}); "
        "default: the autocast in force (none on the command line)", "bf16"))
    world_size: int | None = field(default=None, metadata=_help(
        "plan one rank of a data-parallel job of N processes (the batch and the budget are one rank's)", "8"))
    sharding: Sharding = field(default=Sharding.FULL, metadata=_help(
        "with --world-size: full = FSDP2 (parameters sharded 1/N), none = DDP (replicated)", "none"))
    offload: bool = field(default=True, metadata=_help(
        "blocks may be offloaded to host memory on a card (--no-offload: blocks that do not fit are recomputed)", ""))

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, str, type(None))):
            raise ConfigError(f"budget={self.budget!r} must be bytes (an int), a size such as '40GB', 'auto' or None.")
        if not _is_auto(self.budget):
            try:
                parse_budget(self.budget)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ConfigError(f"device={self.device!r} must be a card name ({', '.join(PROFILES)}) or a torch device.")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision={self.mixed_precision!r}: use one of {tuple(MIXED_PRECISION)} (accelerate's names)."
            )
        if self.world_size is not None and (
            not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 1
        ):
            raise DistributedPlanError(f"world_size={self.world_size!r} must be a positive int (the number of ranks).")
        object.__setattr__(self, "sharding", choice(Sharding, self.sharding, "sharding", DistributedPlanError))
        if not isinstance(self.offload, bool):
            raise ConfigError(
                f"offload={self.offload!r} must be True or False: pass offload=False to forbid offloading blocks "
                "to host memory (the planner then recomputes them), or leave the default True."
            )


@dataclass(frozen=True)
class PlanSettings:
    """A `PlanConfig` resolved for one call: the budget in bytes, the precision, the card.

    Attributes:
        budget_bytes: memory budget of one step, or None (no planning, only the prediction).
        world_size, sharding, offload: as in `PlanConfig`.
        mixed_precision: "no", "bf16" or "fp16".
        reserve_bytes, budget_device: with ``budget="auto"``, the reserve kept out of
            `budget_device`'s free memory (`devices.py`); None for a budget given in bytes.
        device_profile: the card the step is timed on (`devices.PROFILES` name), or None.
    """

    budget_bytes: int | None = None
    world_size: int | None = None
    sharding: Sharding = Sharding.FULL
    mixed_precision: str = "no"
    reserve_bytes: int | None = None
    budget_device: str | None = None
    device_profile: str | None = None
    offload: bool = True

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return MIXED_PRECISION[self.mixed_precision]


def resolve(plan: PlanConfig, model: torch.nn.Module | None) -> PlanSettings:
    """`plan`'s settings for a step of `model` (None: a model built from a config, with fake
    weights). ``budget="auto"`` is read on `plan.device` (default: the model's own device; a
    profile name: an idle card of that kind), whose profile, if any, times the step."""
    own = plan.device if plan.device is not None or model is None else next(model.parameters()).device
    profile = device_profile(own)
    budget, read = plan.budget, {}
    if _is_auto(budget):
        if isinstance(plan.device, str) and plan.device.strip().lower() in PROFILES:  # a card planned from here
            target, auto = profile, auto_budget(PROFILES[profile])
        else:
            target = resolve_device(own)
            auto = auto_budget(target, 0 if model is None else resident_bytes(model, target))
        budget, read = auto.budget_bytes, {"reserve_bytes": auto.reserve_bytes, "budget_device": str(target)}
    return PlanSettings(
        budget_bytes=parse_budget(budget), world_size=plan.world_size, sharding=plan.sharding,
        mixed_precision=plan.mixed_precision or autocast_in_force(), device_profile=profile, offload=plan.offload,
        **read,
    )


def with_budget(plan: PlanConfig | None, budget: int | str | None) -> PlanConfig:
    """`plan` (default: `PlanConfig()`) with `budget`, the functions' shorthand for
    ``plan=PlanConfig(budget=...)``; both given and different is refused."""
    plan = plan or PlanConfig()
    if not isinstance(plan, PlanConfig):
        raise ConfigError(f"plan={plan!r} must be a lorafa_fx.PlanConfig, e.g. plan=PlanConfig(budget='40GB').")
    if budget is None or budget == plan.budget:
        return plan
    if plan.budget is not None:
        raise ConfigError(
            f"budget={budget!r} and plan.budget={plan.budget!r} differ: pass the budget in one place."
        )
    return dataclasses.replace(plan, budget=budget)


def autocast_in_force() -> str:
    """accelerate's name of the autocast the caller runs under ("no" outside autocast)."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return next((name for name, d in MIXED_PRECISION.items() if d == dtype), "no")
    return "no"


def _is_auto(budget: object) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == "auto"
