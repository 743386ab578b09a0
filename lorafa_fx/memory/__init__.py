"""The memory model of one training step and the planner that makes it fit a budget.

`simulate` (the engine: a step on fake tensors, bytes counted) -> `cost_model` (one process)
and `sharded_cost_model` (one rank of FSDP2/DDP), `compose` (a deep step from a sample of its
blocks) -> `flops` (FLOPs per node) and `timing` (a step's seconds on a card) -> `mix` (the
planner's candidates: mixes of block decisions, priced) -> `planner` (under a budget) ->
`report` (the `MemoryPlan` users print). Imports only go down to `ops/` and the leaves: the
rewrites that realise a plan come in as an object (`simulate.Realise`).
"""
