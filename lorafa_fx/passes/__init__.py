"""Graph rewrites, one idea per module: each is a `PassBase` that takes a GraphModule and
returns a `PassResult`. What each reads and writes in `node.meta` is in its docstring and, for
all of them together, in `lorafa_fx.meta`. `_graph` holds the graph-editing helpers they share.
"""
