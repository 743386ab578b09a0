"""What to adapt (`LoraFAConfig`, in PEFT's `LoraConfig` vocabulary) and how to plan the
training step (`PlanSettings`, shared by `transform` and `estimate`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .choices import Sharding, choice
from .errors import ConfigError, DistributedPlanError
from .units import parse_budget

INIT_LORA_A = ("kaiming_uniform", "gaussian", "orthogonal", "ones")
#: accelerate's names for the precision a step runs in, and the autocast dtype of each.
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoraFAConfig:
    """LoRA-FA settings. Field names and meanings follow PEFT's `LoraConfig`.

    Each adapted linear ``y = x W^T`` becomes ``y = x W^T + scaling * (x A^T) B^T`` with
    ``A`` (``lora_A``, shape ``(r, in)``) frozen at its random init and ``B`` (``lora_B``,
    shape ``(out, r)``, zeros) trained; ``scaling = lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``.

    Attributes:
        r: rank of each adapter (default for modules not named in ``rank_pattern``).
        lora_alpha: scaling numerator (default for modules not named in ``alpha_pattern``).
        target_modules: which linears to adapt: ``"all-linear"`` (PEFT's set: every
            ``nn.Linear``/``Conv1D`` but the output embedding), a list of module-name suffixes
            (``["q_proj", "v_proj"]``), or a regex string full-matched against the module path.
            Unlike PEFT, the default is ``"all-linear"``: LoRA-FA's memory saving is largest
            when every linear is adapted. On a mixture-of-experts model ``"all-linear"`` also
            adapts each MoE block's fused expert parameters and its router, as PEFT 0.21 does
            for Mixtral, Qwen3-MoE and OLMoE (see `targets.py`); a name or regex matching an
            experts module or a router adapts its parameters.
        target_parameters: PEFT's: full names or dotted suffixes of parameters adapted as
            such (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]``),
            the experts' 3-D ones with the expert count folded into the rank (``lora_A``
            ``(E·r, in)``, ``lora_B`` ``(out, E·r)``). LoRA-FA adapts only parameters that run
            as a linear or as an experts' grouped matmul.
        exclude_modules: suffix list or full-match regex of modules never adapted.
        rank_pattern: ``{pattern: r}``, pattern matched at the end of the module path.
        alpha_pattern: ``{pattern: lora_alpha}``, same matching.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        lora_dropout: dropout on the adapter's input, as in PEFT (it keeps a mask of the input's
            size for backward, so it costs the memory LoRA-FA otherwise saves).
        modules_to_save: module names (suffixes) trained in full, e.g. ``["classifier"]``.
        init_lora_weights: init of the frozen ``lora_A``: ``"kaiming_uniform"`` (PEFT's, also
            accepted as ``True``), ``"gaussian"`` (std ``1/r``, PEFT's), ``"orthogonal"``,
            ``"ones"`` (the paper's Table 6 options).
        seed: seed of the generator that draws every ``lora_A``, so a transform is reproducible
            without touching the global RNG.

    Two fields are the planner's levers rather than PEFT's; they live here because they change
    what is trained and what the model returns, which a saved config must describe:

        min_r: under a memory budget, the planner may lower the rank of adapters not named in
            ``rank_pattern`` down to ``min_r`` before it recomputes anything (0: it may drop
            them). ``None`` (default): ranks are as configured.
        chunked_cross_entropy: compute a causal LM's loss a chunk of tokens at a time, so the
            full logits never exist (`passes/chunk_cross_entropy.py`; in train mode the
            output's ``logits`` are then ``None``). ``None`` (default): only when the planner
            needs it to meet a budget; ``True``: always; ``False``: never.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str = "all-linear"
    target_parameters: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    lora_dropout: float = 0.0
    modules_to_save: list[str] | None = None
    init_lora_weights: str | bool = "kaiming_uniform"
    seed: int = 0
    min_r: int | None = None
    chunked_cross_entropy: bool | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        for pattern, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", r)
        if self.min_r is not None and (not isinstance(self.min_r, int) or isinstance(self.min_r, bool) or not 0 <= self.min_r <= self.r):
            raise ConfigError(
                f"min_r={self.min_r!r} must be an int in [0, r={self.r}] (0 lets the planner drop adapters), "
                "or None to keep every rank as configured."
            )
        _check_alpha("lora_alpha", self.lora_alpha)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1); use 0.0 to disable it.")
        if self.init_lora_weights is not True and self.init_lora_weights not in INIT_LORA_A:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; LoRA-FA needs a random "
                f"frozen lora_A: use one of {INIT_LORA_A} (True means 'kaiming_uniform')."
            )
        if not self.target_modules and not self.target_parameters:
            raise ConfigError('target_modules is empty; pass "all-linear", a list of suffixes or a regex (or name '
                              "parameters in target_parameters).")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} must be an int (it seeds the generator that draws every lora_A).")
        if isinstance(self.target_parameters, str):
            raise ConfigError(f"target_parameters={self.target_parameters!r} must be a list of parameter names (as in "
                              'PEFT, which has no regex form), e.g. ["mlp.experts.gate_up_proj"].')
        for name in ("target_modules", "target_parameters", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}={value!r} must be module-name suffixes (strings), or a regex string.")
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                _check_regex(f"{name} key", pattern)

    @property
    def init_lora_A(self) -> str:
        return "kaiming_uniform" if self.init_lora_weights is True else str(self.init_lora_weights)


def _check_rank(name: str, r: object) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{name}={r!r} must be a positive int (the adapter rank).")


def _check_alpha(name: str, alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"{name}={alpha!r} must be a finite number > 0; scaling is lora_alpha / r (PEFT's "
                          "default lora_alpha is 8).")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e}); escape special "
                          "characters (re.escape) or pass module-name suffixes as a list.") from None


@dataclass(frozen=True)
class PlanSettings:
    """How a training step is planned; `transform` and `estimate` take the same settings.

    Attributes:
        budget_bytes: memory budget of one step, or None (no planning, only the prediction).
        world_size: plan one rank of a data-parallel job of this many processes, or None (one
            process).
        sharding: with `world_size`: "full" (FSDP2) or "none" (DDP).
        mixed_precision: the precision the step runs in, accelerate's names: "no" (the
            weights' dtype), "bf16" or "fp16" (forward under autocast to that dtype).
        reserve_bytes, budget_device: with ``budget="auto"``, the reserve kept out of
            `budget_device`'s free memory (`devices.py`); None for a budget given in bytes.
        device_profile: the card the step is timed on (`devices.PROFILES` name), or None.
        offload: whether the planner may offload blocks to host memory on `device_profile`'s
            card; False: blocks that do not fit are only recomputed (the step is still timed).
    """

    budget_bytes: int | None = None
    world_size: int | None = None
    sharding: Sharding = Sharding.FULL
    mixed_precision: str = "no"
    reserve_bytes: int | None = None
    budget_device: str | None = None
    device_profile: str | None = None
    offload: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision={self.mixed_precision!r}: use one of {tuple(MIXED_PRECISION)} (accelerate's names)."
            )
        object.__setattr__(self, "sharding", choice(Sharding, self.sharding, "sharding", DistributedPlanError))
        if self.world_size is not None and (
            not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 1
        ):
            raise DistributedPlanError(f"world_size={self.world_size!r} must be a positive int (the number of ranks).")
        if not isinstance(self.offload, bool):
            raise ConfigError(
                f"offload={self.offload!r} must be True or False: pass offload=False to forbid offloading blocks "
                "to host memory (the planner then recomputes them), or leave the default True."
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return MIXED_PRECISION[self.mixed_precision]

    @classmethod
    def from_arguments(
        cls, budget: int | str | None, world_size: int | None, sharding: str, mixed_precision: str | None = None
    ) -> PlanSettings:
        """The settings of a `transform`/`estimate` call (`budget`: bytes or a size string;
        `mixed_precision` None: the autocast in force at the call, else "no")."""
        try:
            budget_bytes = parse_budget(budget)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(budget_bytes, world_size, sharding, mixed_precision or autocast_in_force())


def autocast_in_force() -> str:
    """accelerate's name of the autocast the caller runs under ("no" outside autocast)."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return next((name for name, d in MIXED_PRECISION.items() if d == dtype), "no")
    return "no"
