"""Row-wise backward work a chunk of rows at a time, so its temporaries stay small.

A norm's or a gated activation's backward computes each row of its gradients from the same row
of its saved tensors, through several temporaries of the input's size (a bf16 RMSNorm's backward
makes fp32 copies: ten bf16 inputs' worth of bytes at once). `row_chunks` runs that work on
`CHUNK_BYTES` of rows at a time and writes each chunk's rows into the gradients: every op is
elementwise or a reduction within a row, so the bits are the unchunked ones (reductions along a
row do not depend on how many rows a call holds; a chunk holds a multiple of `ALIGN` elements,
so a CPU kernel's vector loop meets the same elements in its scalar tail, where a transcendental
such as SiLU's exp rounds differently). On fake tensors (the cost model) only the first chunk is
computed: the outputs and one chunk's temporaries are the bytes the real loop holds at its
height, and a 7B step's hundreds of chunks would cost seconds of dispatch. Compiled
(`torch.compile` traces these Functions) the work runs whole: the compiler fuses the temporaries
away and a loop over a symbolic row count would specialise the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

#: Rows per chunk: as many as fit these bytes of the widest tensor's row (fp32 at most).
CHUNK_BYTES = 32 * 2**20
#: Elements per chunk are a multiple of this: ATen's CPU loops run 2 AVX-512 vectors at a time.
ALIGN = 32


def row_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]], rows: Sequence[torch.Tensor | None], outputs: Sequence[torch.dtype],
    shape: torch.Size, row_bytes: int,
) -> tuple[torch.Tensor, ...]:
    """``fn(*rows)`` (tensors of `shape`, or broadcast along its last dim; None passes through),
    computed `CHUNK_BYTES // row_bytes` rows at a time into new tensors of `shape` and the
    dtypes `outputs`."""
    width = shape[-1] if len(shape) else 1
    count = shape.numel() // max(width, 1)
    step = ALIGN // math.gcd(width, ALIGN)
    per = max(step, CHUNK_BYTES // max(row_bytes, 1) // step * step)
    if torch.compiler.is_compiling() or count <= per:
        return fn(*rows)
    device = next(t.device for t in rows if t is not None)
    results = tuple(torch.empty(shape, dtype=dtype, device=device) for dtype in outputs)
    flat = [t.reshape(-1, t.shape[-1]) if t is not None and t.dim() == len(shape) else t for t in rows]
    for start in range(0, per if is_fake(results[0]) else count, per):
        size = min(per, count - start)
        chunk = [t.narrow(0, start, size) if t is not None and t.dim() == 2 and t.shape[0] == count else t
                 for t in flat]
        for result, value in zip(results, fn(*chunk)):
            result.view(-1, width).narrow(0, start, size).copy_(value)
    return results
