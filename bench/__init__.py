"""lorafa_fx's benchmarks, one module per figure, run from the repository root:

    python -m bench                      the benches, one line each
    python -m bench <name> [--smoke]     run one (``--help`` for its options)
    python -m bench save <name> ...      copy bench/out/<name>.json to bench/results/
    python -m bench report               bench/RESULTS.md from bench/results/*.json

A bench module has a docstring (its first line is the listing's, the rest is its section of
RESULTS.md), ``add_arguments(parser)``, ``run(args) -> dict`` (the figures; it prints progress
with `_harness.progress`) and ``markdown(result) -> str`` (its tables). `_harness.run_bench`
adds what every bench shares: ``--smoke``, ``--out``, ``--save``, the JSON's commit, command,
date and machine, and a status line while a bench is silent.
"""

#: The benches, in RESULTS.md's order.
BENCHES = ("methods", "cost_model", "planner", "plan_time", "floor", "moe", "optimizer", "convergence", "eager_step", "gpu")
