"""The graph passes, in pipeline order: each takes a GraphModule and returns a PassResult."""
