"""The memory model of one training step and the planner that makes it fit a budget.

`simulate` (the engine: a step on fake tensors, bytes counted) -> `cost_model` (one process)
and `sharded_cost_model` (one rank of FSDP2/DDP) -> `flops` -> `planner` (under a budget) ->
`report` (the `MemoryPlan` users print). Imports only go down to `passes/` and the leaves.
"""
