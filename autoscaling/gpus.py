"""The GPU types the capacity planner knows: usable memory and an indicative hourly price.

Memory is what ``nvidia-smi`` reports as total (e.g. an H100 80GB has 81,559 MiB, 79.6 GiB),
not the marketing figure, because the engines' memory fractions are fractions of that.
Prices are indicative on-demand list prices per GPU-hour at large clouds in 2025; they
differ by region, commitment and provider, so ``slmctl plan --usd-per-gpu-hour`` overrides
them. They are here for comparing plans, not for invoices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gib: float
    usd_per_hour: float
    # The node label value the NVIDIA GPU feature discovery sets, for node selectors.
    product_label: str


def _gpu(name: str, memory_mib: int, usd_per_hour: float, product_label: str) -> GPUType:
    return GPUType(name, round(memory_mib / 1024, 2), usd_per_hour, product_label)


GPU_TYPES: dict[str, GPUType] = {
    g.name: g
    for g in (
        _gpu("H200-141GB", 143_771, 3.80, "NVIDIA-H200"),
        _gpu("H100-80GB", 81_559, 3.00, "NVIDIA-H100-80GB-HBM3"),
        _gpu("A100-80GB", 81_920, 2.50, "NVIDIA-A100-SXM4-80GB"),
        _gpu("A100-40GB", 40_960, 1.80, "NVIDIA-A100-SXM4-40GB"),
        _gpu("L40S-48GB", 46_068, 1.90, "NVIDIA-L40S"),
        _gpu("A10G-24GB", 23_028, 1.00, "NVIDIA-A10G"),
        _gpu("L4-24GB", 23_034, 0.80, "NVIDIA-L4"),
        _gpu("T4-16GB", 15_360, 0.35, "Tesla-T4"),
    )
}
DEFAULT_GPU = "H100-80GB"


def gpu_type(name: str) -> GPUType:
    """The GPU type by name, case-insensitively; a ``ValueError`` naming the known ones."""
    for known in GPU_TYPES.values():
        if known.name.lower() == name.lower():
            return known
    raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(GPU_TYPES)}")
