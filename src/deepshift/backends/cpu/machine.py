"""What machine the kernels run on: the CPU model and the instruction-set path, for benchmark headers
(the project is built on CPUs that differ between runs, so every timing says where it was taken)."""

from __future__ import annotations

from pathlib import Path

import torch

from deepshift.backends.cpu import build


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"unknown CPU"`` where that is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


_SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
DEFAULT_L1D_BYTES = 32 * 1024
"""The L1 data cache assumed where the OS does not say (the smallest in common x86 CPUs)."""


def l1d_bytes(root: Path = _SYSFS_CACHE) -> int:
    """One core's L1 data cache in bytes, as the OS reports it (Linux sysfs: the level-1 data or
    unified cache of cpu0), clamped to [16 KiB, 256 KiB]; ``DEFAULT_L1D_BYTES`` where not readable.
    The conv kernels size their table blocks from it (``conv.TABLE_BLOCK_BYTES``)."""
    units = {"K": 1024, "M": 1024**2, "": 1}
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() != "1":
                continue
            if (index / "type").read_text().strip() not in ("Data", "Unified"):
                continue
            size = (index / "size").read_text().strip().upper()
            unit = size[-1] if size[-1:] in ("K", "M") else ""
            value = int(size[: len(size) - len(unit)]) * units[unit]
            return min(max(value, 16 * 1024), 256 * 1024)
    except (OSError, ValueError):
        pass
    return DEFAULT_L1D_BYTES


def describe() -> str:
    """One line for a benchmark header: CPU model, the kernels' ISA path, torch version and threads."""
    isa = build.current_isa() if build.native_available() else "reference (native kernels off)"
    return f"{cpu_model()}, ISA path {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads"
