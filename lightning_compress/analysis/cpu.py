"""The CPU flags that decide which integer kernels ONNX Runtime runs on an x86 CPU, for timings and their notes."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

#: The flags (as ``lscpu`` and ``/proc/cpuinfo`` name them) behind ONNX Runtime's x86 int8 kernels: ``avx2``'s
#: uint8 x int8 products add in pairs into saturating 16-bit sums; ``avx512_vnni`` and ``avx_vnni`` add them in 32 bits
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni")


def cpu_flags(cpuinfo: str | None = None) -> dict[str, Any]:
    """This CPU's model name and, for each of :data:`INT8_FLAGS`, whether it has it, plus ``vnni``: either VNNI flag.

    Read from ``cpuinfo`` (the text of ``/proc/cpuinfo``, read here by default). Where no flags can be read
    (a system without ``/proc/cpuinfo``) every flag is ``None``: unknown, not absent.

    Example:
        >>> cpu_flags("model name\\t: AMD EPYC\\nflags\\t\\t: fpu avx2 avx512f avx512_vnni\\n")
        {'model': 'AMD EPYC', 'avx2': True, 'avx512_vnni': True, 'avx_vnni': False, 'vnni': True}
        >>> cpu_flags("")["vnni"] is None
        True
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    models = [value.strip() for key, value in fields if key.strip() == "model name"]
    flag_lines = [value.split() for key, value in fields if key.strip() == "flags"]
    found = {flag: flag in flag_lines[0] if flag_lines else None for flag in INT8_FLAGS}
    vnni = None if not flag_lines else found["avx512_vnni"] or found["avx_vnni"]
    return {"model": models[0] if models else platform.processor(), **found, "vnni": vnni}
