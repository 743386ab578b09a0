"""One rank of tests/test_distributed.py (launched by torchrun): train 5 steps with FSDP2 or DDP (each
run of --runs, then of --compiled-runs under torch.compile),
save the gathered lora_B (and the adapter, by save_adapter), the frozen weights' drift, the
gradient traffic and the measured peak."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from conftest import make_batch, make_model, randomize_lora_B, transform  # noqa: E402

import lorafa_fx  # noqa: E402
from lorafa_fx.distributed import prepare  # noqa: E402
from lorafa_fx.measure import measure_peak_bytes  # noqa: E402
from lorafa_fx.peft_files import _full_tensor  # noqa: E402

STEPS, LR, GLOBAL_BATCH, SEQ, R = 5, 1e-2, 4, 16, 4


def _released(collective, *tensors: torch.Tensor, **kwargs) -> None:
    """Run `collective` on views of `tensors`; return once the backend holds none of them.

    A gloo work object keeps its tensors until the backend's worker thread drops it, some time
    after ``wait()`` returns: FSDP2's all-gather output (one layer's unsharded parameters) then
    sometimes outlives the point where FSDP2 frees it, and the measured peak is one layer higher
    (3 of 188 rank-runs, +11%: a race in the CPU backend, not FSDP2's schedule). Fresh views make
    the backend's references show in the storages' use counts.
    """
    storages = [t.untyped_storage() for t in tensors]
    held = [torch._C._storage_Use_Count(s._cdata) for s in storages]
    collective(*(t.view(t.shape) for t in tensors), async_op=True, **kwargs).wait()
    while any(torch._C._storage_Use_Count(s._cdata) > n for s, n in zip(storages, held)):
        time.sleep(0)


class _ReleasedAllGather(DefaultAllGather):
    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        _released(dist.all_gather_single, output_tensor, input_tensor, group=group)


class _ReleasedReduceScatter(DefaultReduceScatter):
    """gloo reduce-scatters by all-reducing a clone of the input that only its worker thread
    frees; all-reducing FSDP2's input in place (FSDP2 does not read it again) leaves no clone."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        _released(dist.all_reduce, input_tensor, group=group, op=op)
        output_tensor.copy_(input_tensor.chunk(group.size())[group.rank()])


def _measure_with_released_collectives(model: torch.nn.Module, *args) -> int:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(_ReleasedAllGather())
            module.set_custom_reduce_scatter(_ReleasedReduceScatter())
    return measure_peak_bytes(*args)


def run(name: str, out: str, compile: bool, model_name: str = "llama") -> None:
    """`name`: "full" (FSDP2), "none" (DDP), "full_budget" (FSDP2 under a budget that makes the
    planner recompute layers: checkpointing nested in the FSDP units) or "none_lorafaopt" (DDP,
    `create_lorafa_optimizer` instead of AdamW); `model_name`: the zoo's architecture."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sharding = name.split("_")[0]
    batch = make_batch(model_name, GLOBAL_BATCH, SEQ, seed=3)
    rows = GLOBAL_BATCH // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    config = lorafa_fx.LoraFAConfig(r=R)
    budget = None
    if name == "full_budget":
        unplanned = transform(make_model(model_name), example_inputs=local, config=config,
                              plan=lorafa_fx.PlanConfig(world_size=world, sharding=sharding)).lorafa_plan
        budget = unplanned.predicted_peak_bytes - unplanned.saved_by_block["model.layers.1"] // 2
    # conftest's transform: one capture per process (torch.export, ~2 s), its graph reused by every run.
    gm = transform(make_model(model_name), budget, example_inputs=local, config=config,
                   plan=lorafa_fx.PlanConfig(world_size=world, sharding=sharding))
    randomize_lora_B(gm)
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    model = prepare(gm)
    step_model = torch.compile(model) if compile else model
    if name == "none_lorafaopt":  # DDP with the LoRA-FA optimizer (gradient correction)
        opt = lorafa_fx.create_lorafa_optimizer(gm, lr=LR)
    else:
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=LR)

    reduced: set[str] = set()  # parameters whose gradients FSDP2 reduces
    original = fsdp_param_group.foreach_reduce

    def recording(fsdp_params, *args, **kwargs):
        reduced.update(p._param_fqn for p in fsdp_params)
        return original(fsdp_params, *args, **kwargs)

    fsdp_param_group.foreach_reduce = recording

    def step():
        opt.zero_grad(set_to_none=True)
        loss = step_model(**local).loss
        loss.backward()
        opt.step()
        return loss.detach()

    losses = [step() for _ in range(STEPS)]
    fsdp_param_group.foreach_reduce = original
    frozen_grads = [n for n, p in gm.named_parameters() if not p.requires_grad and p.grad is not None]
    lora_B = {n: _full_tensor(p.detach()).clone() for n, p in gm.named_parameters() if p.requires_grad}
    drift = max(float((_full_tensor(p.detach()) - frozen[n]).abs().max()) for n, p in gm.named_parameters()
                if not p.requires_grad)
    adapter = os.path.join(out, f"adapter_{name}{'_compiled' if compile else ''}")
    lorafa_fx.save_adapter(gm, adapter)  # every rank: FSDP2's shards are gathered, rank 0 writes
    peak = None if compile else _measure_with_released_collectives(model, step, model, opt, local)
    ddp_bucketed = None
    if sharding == "none":
        ddp_bucketed = model._get_ddp_logging_data()["total_parameter_size_bytes"]
    torch.save({
        "losses": torch.stack(losses), "lora_B": lora_B, "frozen_drift": drift, "frozen_grads": frozen_grads,
        "reduced_grads": sorted(reduced), "predicted_peak": gm.lorafa_plan.predicted_peak_bytes,
        "measured_peak": peak, "plan": str(gm.lorafa_plan), "adapter": adapter, "ddp_bucketed": ddp_bucketed,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "recomputed": sorted(b for b, d in gm.lorafa_plan.recompute_by_block.items() if d != "keep"),
    }, os.path.join(out, f"{name}{'_compiled' if compile else ''}_rank{rank}.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", default=["full", "none", "full_budget", "none_lorafaopt"])
    parser.add_argument("--compiled-runs", nargs="*", default=[],
                        help="runs to repeat under torch.compile, after the eager ones (files suffixed _compiled)")
    parser.add_argument("--model", default="llama")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in args.runs:
            run(name, args.out, False, args.model)
        for name in args.compiled_runs:
            run(name, args.out, True, args.model)
    finally:
        dist.destroy_process_group()
