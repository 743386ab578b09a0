"""The devices a step is planned for: what one has free (``budget="auto"``) and how fast it
computes and moves bytes (`PROFILES`, read by the step-time model).

``budget = free + resident - reserve``: the memory the device has free now, plus what the
model already holds there (the plan counts its weights, the reading does not), minus a reserve
for what the step uses outside the tensors the plan counts. A CUDA device's free memory is the
driver's (`torch.cuda.mem_get_info`) plus what torch's caching allocator holds unused; the
CPU's is the kernel's MemAvailable (psutil). A profile name (``device="h100"``) plans for that
card from this machine: its memory is the free memory of an idle card.

A leaf module: it imports only leaves.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import psutil
import torch
from torch._subclasses.fake_tensor import is_fake

from .errors import ConfigError
from .units import format_bytes

_GiB = 2**30


class Reserve(NamedTuple):
    """Memory kept out of an automatic budget: ``fixed_bytes + fraction * free``."""

    fixed_bytes: int
    fraction: float


#: The reserve of each device kind. Not measured in this project (its CI has no GPU): each term
#: says what it stands for and where its size comes from; lower it where a measured step allows.
RESERVE = {
    # fixed: kernels CUDA loads lazily after the reading (CUDA_MODULE_LOADING=LAZY: cuBLAS,
    # cuDNN, NCCL, Triton modules, a few hundred MB) and the cuBLAS/cuBLASLt workspaces, 32 MiB
    # per handle and stream on Hopper (cuBLAS docs, cublasSetWorkspace; pytorch#120925), which
    # torch allocates beside the step's tensors. The CUDA context itself is in the reading:
    # `mem_get_info` creates it first.
    # fraction: the caching allocator's fragmentation (blocks rounded up to 512 B / 2 MiB, large
    # segments split and cached), which grows with the peak rather than being a fixed amount;
    # 5% is a judgement until a measured GPU step (reserved vs allocated at the peak) replaces it.
    "cuda": Reserve(fixed_bytes=1 * _GiB, fraction=0.05),
    # MemAvailable already leaves the kernel's low watermarks out (Documentation/filesystems/
    # proc.rst: "available for starting new applications, without swapping"), and glibc returns large
    # blocks to the system when freed (mmap threshold), so no fraction; the fixed part covers
    # what the plan does not count: autograd's graph objects and the interpreter's growth.
    "cpu": Reserve(fixed_bytes=1 * _GiB, fraction=0.0),
}


class DeviceProfile(NamedTuple):
    """What the step-time model reads of a device (datasheet figures; `source` names them)."""

    name: str
    dense_bf16_flops: float  # FLOP/s, dense (no sparsity), bf16 tensor cores
    host_link_bytes_per_s: float  # host <-> device, one direction, nominal
    memory_bytes: int
    source: str


#: Devices a plan can be made for. A training step reaches a fraction of the datasheet's FLOP/s
#: (`ACHIEVED_FRACTION`); the fractions below are the same for all, so predicted overheads (extra
#: FLOPs over a step's) do not depend on it.
PROFILES = {
    "a100": DeviceProfile("NVIDIA A100 80GB SXM", 312e12, 32e9, 80 * 10**9,
                          "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense; PCIe 4.0 x16: 32 GB/s; 80 GB HBM2e"),
    "h100": DeviceProfile("NVIDIA H100 SXM5", 989e12, 64e9, 80 * 10**9,
                          "NVIDIA H100 datasheet: 989 TFLOPS BF16 dense (1979 with sparsity); PCIe 5.0 x16: "
                          "64 GB/s; 80 GB HBM3"),
    "h200": DeviceProfile("NVIDIA H200 SXM", 989e12, 64e9, 141 * 10**9,
                          "NVIDIA H200 datasheet: 989 TFLOPS BF16 dense (H100's compute); PCIe 5.0 x16: 64 GB/s; "
                          "141 GB HBM3e"),
}
#: Model FLOPs utilisation of an eager transformers training step (matmuls at a fraction of peak,
#: elementwise ops bound by memory): a judgement from published MFU figures (35-50% for tuned
#: stacks); bench/gpu.py measures steps to replace it.
ACHIEVED_FRACTION = 0.4


def device_profile(device: object) -> str | None:
    """The `PROFILES` key `device` names ("h100", any case), or for a local CUDA device the key
    its name contains ("NVIDIA H100 80GB HBM3" -> "h100"); None for another device. A name that
    is neither a profile nor a torch device ("h10", "banana") raises `ConfigError`: read as no
    card, it would silently plan without the card's timing and offload."""
    key = device.strip().lower() if isinstance(device, str) else None
    if key in PROFILES:
        return key
    try:
        local = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r} is neither a card to plan for ({', '.join(PROFILES)}) nor a torch device: pass one "
            "of those names, or a torch device string such as 'cpu', 'cuda' or 'cuda:0'."
        ) from None
    if local is None or local.type != "cuda" or not torch.cuda.is_available():
        return None
    if local.index is not None and local.index >= torch.cuda.device_count():
        return None  # no such device: `resolve_device` says so where it matters
    try:
        name = torch.cuda.get_device_name(local).lower()
    except (RuntimeError, AssertionError):  # torch raises AssertionError on a build without CUDA
        return None
    return next((k for k in PROFILES if k in name), None)


class AutoBudget(NamedTuple):
    """An automatic budget and the reading it comes from (bytes)."""

    budget_bytes: int
    free_bytes: int
    reserve_bytes: int


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a step will run on: `device`, or (None) the current CUDA device where CUDA is
    available, else the CPU. An indexed CUDA device that this machine lacks is refused."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r} is not a device: pass 'cpu', 'cuda' or 'cuda:N' for budget='auto' to read, or a "
            f"card to plan for: one of {', '.join(PROFILES)}."
        ) from None
    if resolved.type not in RESERVE:
        raise ConfigError(
            f"device={device!r}: budget='auto' reads the free memory of {' and '.join(RESERVE)} devices only; "
            "pass an explicit budget such as budget='40GB'."
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r}: CUDA is not available on this machine (torch {torch.__version__}), so "
                "budget='auto' cannot read its free memory; pass device='cpu', or an explicit budget such as "
                "budget='80GB' to plan for a GPU elsewhere."
            )
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}); pass one of them, or an explicit budget such as budget='80GB'."
            )
        resolved = torch.device("cuda", index)
    return resolved


def auto_budget(device: torch.device | DeviceProfile, resident_bytes: int = 0) -> AutoBudget:
    """The budget ``budget="auto"`` means on `device` (from `resolve_device`, or a profile: an
    idle card of that kind), where the model already holds `resident_bytes` that the plan counts."""
    profiled = isinstance(device, DeviceProfile)
    free = device.memory_bytes if profiled else _free_bytes(device)
    kind = RESERVE["cuda" if profiled else device.type]
    reserve = kind.fixed_bytes + int(kind.fraction * free)
    budget = free + resident_bytes - reserve
    if budget <= 0:
        raise ConfigError(
            f"budget='auto': {device} has {format_bytes(free)} free (and the model {format_bytes(resident_bytes)} "
            f"there), not more than the {format_bytes(reserve)} reserve; free memory on {device} or pass an "
            "explicit budget such as budget='40GB'."
        )
    return AutoBudget(budget, free, reserve)


def resident_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes `model`'s weights and buffers hold on `device`: the plan counts them, a free-memory
    reading does not (shared storages once; fake weights hold none)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in itertools.chain(model.parameters(), model.buffers())
        if t.device == device and not is_fake(t)
    }
    return sum(storages.values())


def _free_bytes(device: torch.device) -> int:
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    free, _total = torch.cuda.mem_get_info(device)
    # Blocks the caching allocator holds but no tensor uses are free to this process's step.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)
