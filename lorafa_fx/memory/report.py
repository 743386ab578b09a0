"""`MemoryPlan`: the memory of one training step, as predicted for a transformed graph.

It is what ``print(gm.lorafa_plan)`` shows: the adapted layers with their rank, recompute
decision and saved bytes; where the bytes go (weights, optimizer states, activations by
block); the predicted peak and where it happens, against the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from io import StringIO
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .. import meta
from ..choices import Decision, Sharding
from ..devices import ACHIEVED_FRACTION, PROFILES
from ..ops.offload import COPIES_IN_FLIGHT
from ..ops.regions import MINI_SEQUENCE_CHUNKS
from ..plan_config import PlanSettings
from ..units import block_of_path, format_bytes, natural_key

if TYPE_CHECKING:
    import torch.fx as fx

    from ..targets import Adapter, Task
    from .simulate import StepEstimate


@dataclass(frozen=True)
class LayerPlan:
    """One adapted linear: its rank, what backward recomputes, and the bytes it saves."""

    path: str
    r: int
    recompute: Decision  # KEEP: xa is kept for backward
    saved_bytes: int
    configured_r: int | None = None  # set when the planner lowered the rank


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one training step (forward, backward, optimizer step), in bytes."""

    predicted_peak_bytes: int
    budget_bytes: int | None
    weights_bytes: int
    buffers_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    saved_activation_bytes: int
    peak_phase: str
    peak_node: str
    peak_module: str
    batch_shape: dict[str, tuple[int, ...]]
    layers: tuple[LayerPlan, ...]
    saved_by_block: dict[str, int] = field(default_factory=dict)
    recompute_by_block: dict[str, Decision] = field(default_factory=dict)
    recompute_flops: int = 0
    step_flops: int = 0
    dropped_adapters: tuple[str, ...] = ()  # configured, dropped by the planner
    chunked_cross_entropy: bool = False
    world_size: int | None = None  # data parallel: the plan is one rank's
    sharding: Sharding | None = None  # FULL (FSDP2: every parameter 1/world_size) or NONE (DDP)
    mixed_precision: str = "no"  # the step's forward under autocast: "bf16", "fp16", or "no"
    reserve_bytes: int | None = None  # budget="auto": kept out of budget_device's free memory
    budget_device: str | None = None
    device_profile: str | None = None  # the card the step is timed on (`devices.PROFILES`)
    offload_seconds: float = 0.0  # time compute waits for the host link (`timing.transfer_wait`)
    offload: bool = True  # False: the planner was forbidden to offload (offload=False, --no-offload)
    task_type: str | None = None  # PEFT's task type the model is adapted for
    task_inferred_from: str | None = None  # the model class task_type was inferred from (None: configured)
    trained_modules: tuple[str, ...] = ()  # trained in full (modules_to_save, the task's head)

    @property
    def fits(self) -> bool | None:
        """Whether the predicted peak is within the budget (None without a budget)."""
        return None if self.budget_bytes is None else self.predicted_peak_bytes <= self.budget_bytes

    @property
    def step_seconds(self) -> float | None:
        """Predicted time of the step (forward, backward, recomputation) on `device_profile`:
        its FLOPs at `devices.ACHIEVED_FRACTION` of the card's dense bf16 FLOP/s, plus the time
        it waits for the host link (`memory/timing.py`)."""
        if self.device_profile is None or not self.step_flops:
            return None
        rate = PROFILES[self.device_profile].dense_bf16_flops * ACHIEVED_FRACTION
        return (self.step_flops + self.recompute_flops) / rate + self.offload_seconds

    @property
    def overhead_pct(self) -> float | None:
        """The step's predicted time over the same step with nothing recomputed or offloaded, in %."""
        if self.step_seconds is None:
            return None
        rate = PROFILES[self.device_profile].dense_bf16_flops * ACHIEVED_FRACTION
        return 100.0 * (self.step_seconds / (self.step_flops / rate) - 1)

    @property
    def extra_compute_pct(self) -> float:
        """Recompute FLOPs in % of a step's forward + backward FLOPs."""
        return 100.0 * self.recompute_flops / self.step_flops if self.step_flops else 0.0

    @classmethod
    def from_estimate(
        cls,
        gm: fx.GraphModule,
        estimate: StepEstimate,
        batch: Mapping[str, object],
        settings: PlanSettings | None = None,
        recompute_by_block: Mapping[str, Decision] | None = None,
        recompute_flops: int = 0,
        step_flops: int = 0,
        configured: Sequence[Adapter] = (),
        offload_seconds: float = 0.0,
        task: Task | None = None,
        trained_modules: Sequence[str] = (),
    ) -> MemoryPlan:
        """`settings`: the budget and the step planned (default: none, one process);
        `configured`: the adapters the config asked for, when the planner changed them;
        `task`: the task adapted for; `trained_modules`: the modules trained in full."""
        settings = settings or PlanSettings()
        decisions = dict(recompute_by_block or {})
        configured_r = {a.path: a.r for a in configured}
        kept = {a.path for a in gm.lorafa.adapters}
        xa_bytes: dict[str, int] = {}
        # Layers outlined for FSDP2 hold their adapters in their own graphs.
        for node in meta.all_graph_nodes(gm):
            info = meta.lorafa_meta(node)
            if info.get(meta.ROLE) == "xa":
                xa_bytes[info[meta.ADAPTER]] = xa_bytes.get(info[meta.ADAPTER], 0) + info.get(meta.SAVED_BYTES, 0)
        return cls(
            predicted_peak_bytes=estimate.peak,
            budget_bytes=settings.budget_bytes,
            weights_bytes=estimate.weights,
            buffers_bytes=estimate.buffers,
            optimizer_state_bytes=estimate.optimizer_states,
            batch_bytes=estimate.batch,
            saved_activation_bytes=estimate.saved_activations,
            peak_phase=estimate.peak_phase,
            peak_node=estimate.peak_node,
            peak_module=estimate.peak_module,
            batch_shape={k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
            layers=tuple(
                LayerPlan(a.path, a.r, decisions.get(block_of_path(a.path), Decision.KEEP), xa_bytes.get(a.path, 0),
                          configured_r[a.path] if configured_r.get(a.path, a.r) != a.r else None)
                for a in gm.lorafa.adapters
            ),
            dropped_adapters=tuple(p for p in configured_r if p not in kept),
            chunked_cross_entropy=gm.lorafa.chunked_loss,
            saved_by_block=dict(estimate.saved_by_module),
            recompute_by_block=decisions,
            recompute_flops=recompute_flops,
            step_flops=step_flops,
            world_size=settings.world_size,
            sharding=settings.sharding if settings.world_size is not None else None,
            mixed_precision=settings.mixed_precision,
            reserve_bytes=settings.reserve_bytes,
            budget_device=settings.budget_device,
            device_profile=settings.device_profile,
            offload_seconds=offload_seconds,
            offload=settings.offload,
            task_type=task.task_type if task else None,
            task_inferred_from=task.inferred_from if task else None,
            trained_modules=tuple(trained_modules),
        )

    @property
    def recomputed_blocks(self) -> list[str]:
        """The blocks backward recomputes, in model order."""
        return self.blocks_deciding(Decision.RECOMPUTE)

    @property
    def offloaded_blocks(self) -> list[str]:
        """The blocks whose saved tensors wait in host memory, in model order."""
        return self.blocks_deciding(Decision.OFFLOAD)

    def blocks_deciding(self, decision: Decision) -> list[str]:
        """The blocks the plan gives `decision`, in model order."""
        return sorted((b for b, d in self.recompute_by_block.items() if d is decision), key=natural_key)

    @property
    def trainable_rank_total(self) -> int:
        return sum(layer.r for layer in self.layers)

    def to_dict(self) -> dict:
        """JSON-serialisable form (plain dicts, lists, ints and strings)."""
        d = asdict(self)
        d["batch_shape"] = {k: list(v) for k, v in self.batch_shape.items()}
        d["fits"] = self.fits
        d["step_seconds"] = self.step_seconds
        d["overhead_pct"] = self.overhead_pct
        return d

    def __str__(self) -> str:
        return render(self._summary(), self._layers_table(), self._blocks_table())

    def summary(self) -> str:
        """The plan's first table only (totals, decisions, step time), without the per-layer and per-block ones."""
        return render(self._summary())

    def _summary(self) -> Table:
        t = Table(title="lorafa_fx memory plan (one training step)", show_header=False)
        t.add_column(justify="left")
        t.add_column(justify="left")
        shape = ", ".join(f"{k} {tuple(v)}" for k, v in self.batch_shape.items())
        t.add_row("batch" if self.world_size is None else "batch (per rank)", shape)
        if self.world_size is not None:
            t.add_row("data parallel", _data_parallel(self.world_size, self.sharding))
        t.add_row("precision", _PRECISION[self.mixed_precision])
        if self.task_type is not None:
            how = f"inferred from {self.task_inferred_from}; " if self.task_inferred_from else ""
            t.add_row("task (PEFT's task_type)", f"{self.task_type} ({how}LoraFAConfig(task_type=...) sets it)")
        if self.trained_modules:
            t.add_row("trained in full (modules_to_save)", ", ".join(self.trained_modules))
        t.add_row("weights + buffers", format_bytes(self.weights_bytes + self.buffers_bytes))
        t.add_row("optimizer states", format_bytes(self.optimizer_state_bytes))
        t.add_row("saved activations (end of forward)", format_bytes(self.saved_activation_bytes))
        t.add_row("predicted peak", format_bytes(self.predicted_peak_bytes))
        t.add_row("peak happens in", f"{self.peak_phase} at {self.peak_node} ({self.peak_module or 'root'})")
        budget = "none" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        if self.reserve_bytes is None:
            t.add_row("budget", budget)
        else:
            t.add_row("budget", f"{budget} (auto: {self.budget_device}'s free memory minus the reserve)")
            t.add_row("reserve (memory the plan does not count)", format_bytes(self.reserve_bytes))
        if self.fits is False:
            t.add_row("fits the budget", "no: shown is the plan at the smallest budget that can be met")
        recomputed = self.recomputed_blocks
        t.add_row("blocks recomputed in backward", f"{len(recomputed)}: {', '.join(recomputed)}" if recomputed else "none")
        for decision, label in _DECIDED.items():
            if blocks := self.blocks_deciding(decision):
                t.add_row(label, f"{len(blocks)}: {_ranges(blocks)}")
        if not self.offload:
            t.add_row("offload to host memory", "forbidden (offload=False): blocks that do not fit are recomputed")
        t.add_row("extra compute", f"{self.extra_compute_pct:.1f}% of a step's FLOPs")
        if self.step_seconds is not None:
            card = PROFILES[self.device_profile]
            t.add_row(f"predicted step time ({card.name})",
                      f"{self.step_seconds * 1e3:.0f} ms (+{self.overhead_pct:.1f}% over the step with nothing "
                      f"recomputed or offloaded; {self.offload_seconds * 1e3:.0f} ms of it waiting for the host link)")
            link = card.host_link_bytes_per_s / 1e9
            t.add_row("time model", f"FLOPs (matmuls, attention) at {ACHIEVED_FRACTION:.0%} of "
                      f"{card.dense_bf16_flops / 1e12:.0f} TFLOP/s; host link {link:.0f} GB/s each way, one copy at "
                      f"a time, each from when it is saved, overlapped with compute, at most {COPIES_IN_FLIGHT} blocks' copies to the host in "
                      "flight; a block's fetch starts when backward reaches the offloaded block after it")
        lowered = sum(layer.configured_r is not None for layer in self.layers)
        if lowered or self.dropped_adapters:
            t.add_row("adapters changed by the planner", f"{lowered} ranks lowered, {len(self.dropped_adapters)} dropped")
        if self.chunked_cross_entropy:
            t.add_row("loss", "chunked cross-entropy (no logits in train mode)")
        return t

    def _layers_table(self) -> Table:
        t = Table(title=f"{len(self.layers)} adapted layers (total rank {self.trainable_rank_total})")
        for name, justify in (("module", "left"), ("r", "right"), ("recompute", "left"), ("saved", "right")):
            t.add_column(name, justify=justify)
        for layer in _abbreviate(self.layers):
            if layer is None:
                t.add_row(f"... {len(self.layers) - _SHOWN_LAYERS} more ...", "", "", "")
            else:
                r = str(layer.r) if layer.configured_r is None else f"{layer.r} (of {layer.configured_r})"
                t.add_row(layer.path, r, layer.recompute, format_bytes(layer.saved_bytes))
        return t

    def _blocks_table(self) -> Table:
        t = Table(title="saved activations by block")
        t.add_column("block")
        t.add_column("recompute")
        t.add_column("saved", justify="right")
        for block, nbytes in sorted(self.saved_by_block.items(), key=lambda kv: natural_key(kv[0])):
            t.add_row(block, str(self.recompute_by_block.get(block, Decision.KEEP)), format_bytes(nbytes))
        return t


def render(*tables: Table) -> str:
    """`tables` as plain text, 110 columns wide (the plan's printout and the CLI's sweep table)."""
    out = StringIO()
    console = Console(file=out, width=110, force_terminal=False, color_system=None)
    for table in tables:
        console.print(table)
    return out.getvalue().rstrip()


def _data_parallel(world_size: int, sharding: Sharding | None) -> str:
    if sharding is Sharding.FULL:
        return (f"{world_size} ranks, FSDP2: base weights, adapters and optimizer states sharded 1/{world_size}; "
                "peak is one rank's, with its all-gathered layers")
    return f"{world_size} ranks, DDP: everything replicated; peak is one rank's, with gradient buckets"


_PRECISION = {
    "no": "the weights' dtype (no autocast)",
    "bf16": "mixed bf16 (forward under autocast)",
    "fp16": "mixed fp16 (forward under autocast)",
}
_SHOWN_LAYERS = 24
#: The summary's row for each decision other than keep and recompute (which has its own row).
_DECIDED = {
    Decision.OFFLOAD: "blocks offloaded to host memory",
    Decision.OFFLOAD_CHECKPOINT: "blocks recomputed from an input in host memory",
    Decision.OFFLOAD_MLP: "blocks offloading their MLP up to its last linear",
    Decision.OFFLOAD_SELECTIVE: "blocks offloaded, their MLP's gate recomputed",
    Decision.SELECTIVE: "blocks recomputing their MLP up to its last linear",
    Decision.MINI_SEQUENCE: f"blocks recomputed, the MLP in {MINI_SEQUENCE_CHUNKS} chunks of tokens",
    Decision.OFFLOAD_MINI_SEQUENCE: f"blocks recomputed from host memory, the MLP in {MINI_SEQUENCE_CHUNKS} chunks",
}


def _ranges(blocks: list[str]) -> str:
    """``model.layers.1-9, model.layers.12``: runs of consecutive blocks of one stack, joined."""
    runs: list[list[str]] = []
    for b in blocks:
        stack, _, index = b.rpartition(".")
        last = runs[-1][-1].rpartition(".") if runs else None
        if last is not None and last[0] == stack and int(last[2]) + 1 == int(index):
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1].rpartition('.')[2]}" for run in runs)


def _abbreviate(layers: tuple[LayerPlan, ...]) -> list[LayerPlan | None]:
    # A 70B model has 560 adapters; the printout keeps the first and last ones (None: the gap).
    if len(layers) <= _SHOWN_LAYERS:
        return list(layers)
    half = _SHOWN_LAYERS // 2
    return [*layers[:half], None, *layers[-half:]]
