"""`LoraFAConfig`: what to adapt and how, in PEFT's `LoraConfig` vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

INIT_LORA_A = ("kaiming_uniform", "gaussian", "orthogonal", "ones")


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
            when every linear is adapted.
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
            raise ValueError(
                f"min_r={self.min_r!r} must be an int in [0, r={self.r}] (0 lets the planner drop adapters), "
                "or None to keep every rank as configured."
            )
        if not self.lora_alpha > 0 or any(not a > 0 for a in self.alpha_pattern.values()):
            raise ValueError("lora_alpha and alpha_pattern values must be > 0; scaling is lora_alpha / r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1); use 0.0 to disable it.")
        if self.init_lora_weights is not True and self.init_lora_weights not in INIT_LORA_A:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; LoRA-FA needs a random "
                f"frozen lora_A: use one of {INIT_LORA_A} (True means 'kaiming_uniform')."
            )
        if not self.target_modules:
            raise ValueError('target_modules is empty; pass "all-linear", a list of suffixes or a regex.')

    @property
    def init_lora_A(self) -> str:
        return "kaiming_uniform" if self.init_lora_weights is True else str(self.init_lora_weights)


def _check_rank(name: str, r: object) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{name}={r!r} must be a positive int (the adapter rank).")
