"""The fake state a simulated step runs on: fake copies of a graph's parameters and inputs in
its `FakeTensorMode`, and the optimizer states a later step starts with."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake


def parameter_layout(gm: fx.GraphModule) -> tuple:
    """What a fake copy of `gm`'s parameters depends on: names, shapes, dtypes, which train,
    and which are tied (a planner's rungs that differ only in their graphs share it)."""
    first: dict[int, str] = {}
    return tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad, first.setdefault(id(p), name))
        for name, p in gm.named_parameters(remove_duplicate=False)
    )


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    # A model built under FakeTensorMode (estimate() from a config) keeps its mode; real
    # weights get a fresh one with static shapes: the batch shape is concrete here.
    mode = detect_fake_mode([p for p in gm.parameters()])
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=False)


def fake_param(mode: FakeTensorMode, p: torch.Tensor) -> torch.Tensor:
    fake = p if is_fake(p) else mode.from_tensor(p, static_shapes=True)
    return torch.nn.Parameter(fake, requires_grad=p.requires_grad)


def fake_input(mode: FakeTensorMode, value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value if is_fake(value) else mode.from_tensor(value, static_shapes=True)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype):
        shape, dtype = value
        return torch.zeros(shape, dtype=dtype)
    return value


def allocate_optimizer_states(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    # The step measured is a later one: states exist before it starts. A parameter's states
    # depend on its shape, dtype and group only, so one step on one parameter of each kind
    # makes them, and the others get copies: fake tensor ops cost the same at any size, and a
    # 7B model's 224 adapters are two kinds. A multi-tensor step makes the same states as the
    # per-parameter loop (torch's default on CPU); the step simulated later runs as configured.
    kinds: dict[tuple, torch.Tensor] = {}
    of_kind: list[tuple[torch.Tensor, torch.Tensor]] = []
    trained = {id(p) for p in params}
    for i, group in enumerate(opt.param_groups):
        for p in (p for p in group["params"] if id(p) in trained):
            of_kind.append((p, kinds.setdefault((i, p.shape, p.dtype, p.device), p)))
    for p in kinds.values():
        p.grad = torch.zeros_like(p)
    configured = [group.get("foreach") for group in opt.param_groups]
    for group in opt.param_groups:
        if "foreach" in group:
            group["foreach"] = True
    opt.step()
    for group, foreach in zip(opt.param_groups, configured):
        if "foreach" in group:
            group["foreach"] = foreach
    opt.zero_grad(set_to_none=True)
    for p, kind in of_kind:
        if p is not kind:
            opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[kind].items()}
