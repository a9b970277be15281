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


def describe() -> str:
    """One line for a benchmark header: CPU model, the kernels' ISA path, torch version and threads."""
    isa = build.current_isa() if build.native_available() else "reference (native kernels off)"
    return f"{cpu_model()}, ISA path {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads"
