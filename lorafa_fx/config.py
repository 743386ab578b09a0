"""What to adapt: `LoraFAConfig`, in PEFT's `LoraConfig` vocabulary (how to plan the step is
`plan_config.PlanConfig`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import ConfigError

INIT_LORA_A = ("kaiming_uniform", "gaussian", "orthogonal", "ones")
#: The scalings (``lora_alpha / r``) a config accepts. The LoRA-FA optimizer's correction divides
#: lora_B's gradient (which carries one factor of scaling) by scaling**2, so its step grows as
#: 1 / scaling; Adam squares it in float32 (max ~3.4e38, smallest normal ~1.2e-38). At 1e-6 a
#: gradient of 1e13 still squares finitely, at 1e6 one of 1e-13 does not vanish: PEFT's usual
#: scalings (0.01 to 64) are far inside, and lora_alpha=1e-20 or 1e30 (NaN after two steps, or
#: lora_B frozen at 0) far outside.
SCALING_RANGE = (1e-6, 1e6)
#: PEFT's ``TaskType`` values a LoRA config takes (``peft.utils.peft_types.TaskType``).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass(frozen=True)
class LoraFAConfig:
    """LoRA-FA settings. Field names and meanings follow PEFT's `LoraConfig`.

    Each adapted linear ``y = x W^T`` becomes ``y = x W^T + scaling * (x A^T) B^T`` with
    ``A`` (``lora_A``, shape ``(r, in)``) frozen at its random init and ``B`` (``lora_B``,
    shape ``(out, r)``, zeros) trained; ``scaling = lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``.

    Attributes:
        r: rank of each adapter (default for modules not named in ``rank_pattern``).
        lora_alpha: scaling numerator (default for modules not named in ``alpha_pattern``); every
            scaling the config can give an adapter must lie in `SCALING_RANGE`.
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
        task_type: PEFT's task type (a ``TASK_TYPES`` name or a ``peft.TaskType``). For
            ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` the modules named ``classifier`` or ``score``, for
            ``"QUESTION_ANS"`` ``qa_outputs``, are added to ``modules_to_save`` as PEFT adds them
            (trained in full, no adapter); the other types change only the saved adapter config.
            ``None`` (default): the task the model's class is for (`targets.infer_task_type`:
            ``BertForSequenceClassification`` -> ``"SEQ_CLS"``), shown in the plan's printout.
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

    r: int = field(default=8, metadata={"help": "the adapter rank r"})
    lora_alpha: float = field(default=8, metadata={"help": "lora_alpha: scaling = lora_alpha / r"})
    target_modules: list[str] | str = "all-linear"
    target_parameters: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    lora_dropout: float = 0.0
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    init_lora_weights: str | bool = "kaiming_uniform"
    seed: int = 0
    min_r: int | None = None
    chunked_cross_entropy: bool | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        for name in ("rank_pattern", "alpha_pattern"):
            _check_pattern_dict(name, getattr(self, name))
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
        _check_bool("use_rslora", self.use_rslora, "True turns on rank-stabilised scaling lora_alpha / sqrt(r)")
        _check_bool("chunked_cross_entropy", self.chunked_cross_entropy,
                    "True: always chunk the loss, False: never, None: when the planner needs it", none=True)
        self._check_scaling()
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not (
            0.0 <= self.lora_dropout < 1.0
        ):
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1); use 0.0 to disable it.")
        if self.init_lora_weights is not True and self.init_lora_weights not in INIT_LORA_A:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; LoRA-FA needs a random "
                f"frozen lora_A: use one of {INIT_LORA_A} (True means 'kaiming_uniform')."
            )
        if self.task_type is not None:
            task_type = getattr(self.task_type, "value", self.task_type)  # peft.TaskType is a str Enum
            if task_type not in TASK_TYPES:
                raise ConfigError(f"task_type={self.task_type!r} is not one of PEFT's task types {TASK_TYPES}; pass "
                                  "None to take the task the model's class is for.")
            object.__setattr__(self, "task_type", str(task_type))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} must be an int (it seeds the generator that draws every lora_A).")
        if isinstance(self.modules_to_save, str):
            raise ConfigError(
                f"modules_to_save={self.modules_to_save!r} is a string; pass a list of module names, e.g. "
                f"modules_to_save=[{self.modules_to_save!r}] (PEFT 0.21 would read a string character by character)."
            )
        if isinstance(self.target_parameters, str):
            raise ConfigError(f"target_parameters={self.target_parameters!r} must be a list of parameter names (as in "
                              'PEFT, which has no regex form), e.g. ["mlp.experts.gate_up_proj"].')
        for name in ("target_modules", "target_parameters", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is None and name != "target_modules":
                continue
            if not isinstance(value, (str, list, tuple)) or (
                not isinstance(value, str) and not all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(f"{name}={value!r} must be module-name suffixes (a list of strings), or a regex.")
        if not self.target_modules and not self.target_parameters:
            raise ConfigError('target_modules is empty; pass "all-linear", a list of suffixes or a regex (or name '
                              "parameters in target_parameters).")
        if isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear":
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                _check_regex(f"{name} key", pattern)

    def _check_scaling(self) -> None:
        """Every scaling an adapter can get (any rank the config or the planner may give it, with
        any of its alphas) within `SCALING_RANGE`: see there why."""
        ranks = [self.r, *self.rank_pattern.values(), *([self.min_r] if self.min_r else [])]
        alphas = [self.lora_alpha, *self.alpha_pattern.values()]
        low, high = SCALING_RANGE
        for r in (min(ranks), max(ranks)):
            root, formula = (math.sqrt(r), "lora_alpha / sqrt(r)") if self.use_rslora else (r, "lora_alpha / r")
            for alpha in (min(alphas), max(alphas)):
                if not low <= alpha / root <= high:
                    raise ConfigError(
                        f"lora_alpha={alpha!r} with r={r} gives scaling {formula} = {alpha / root:g}, outside "
                        f"[{low:g}, {high:g}]: the LoRA-FA optimizer divides lora_B's gradient by scaling**2, "
                        "so beyond that range Adam's moments overflow (NaN) or underflow (lora_B never moves). "
                        f"Pick lora_alpha between {low * root:g} and {high * root:g} for r={r} (PEFT's default "
                        "lora_alpha is 8)."
                    )

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


def _check_bool(name: str, value: object, meaning: str, none: bool = False) -> None:
    # "false" and "no" are truthy: only a real bool (or None where it has a meaning) is read as one.
    if not isinstance(value, bool) and not (none and value is None):
        accepted = "True, False or None" if none else "True or False"
        raise ConfigError(f"{name}={value!r} must be {accepted} ({meaning}); a string such as 'false' is not a bool.")


def _check_pattern_dict(name: str, patterns: object) -> None:
    if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
        raise ConfigError(
            f"{name}={patterns!r} must be a dict from module-name pattern to value, e.g. {name}={{'q_proj': 16}} "
            "(patterns match the end of the module path, as in PEFT)."
        )


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression ({e}); escape special "
                          "characters (re.escape) or pass module-name suffixes as a list.") from None
