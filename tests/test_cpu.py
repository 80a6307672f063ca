from __future__ import annotations

import shutil
import subprocess

import pytest

from lightning_compress.analysis.cpu import INT8_FLAGS, cpu_flags

AVX2_ONLY = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
AVX_VNNI = "processor\t: 0\nmodel name\t: Intel Core i7-12700\nflags\t\t: fpu avx2 avx_vnni\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, {"model": "Intel Xeon", "avx2": True, "avx512_vnni": False, "avx_vnni": False, "vnni": False}),
        (
            AVX_VNNI,
            {"model": "Intel Core i7-12700", "avx2": True, "avx512_vnni": False, "avx_vnni": True, "vnni": True},
        ),
    ],
    ids=["avx2-only", "avx-vnni"],
)
def test_cpu_flags_reads_the_flags_behind_onnx_runtimes_int8_kernels(cpuinfo: str, expected: dict) -> None:
    assert cpu_flags(cpuinfo) == expected


def test_unreadable_flags_are_unknown_not_absent() -> None:
    flags = cpu_flags("")
    assert all(flags[name] is None for name in (*INT8_FLAGS, "vnni"))


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu is not installed")
def test_this_machines_flags_are_the_ones_lscpu_lists() -> None:
    listed = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30, check=True).stdout
    flags = next(line.split(":", 1)[1].split() for line in listed.splitlines() if line.startswith("Flags:"))
    found = cpu_flags()
    assert {name: found[name] for name in INT8_FLAGS} == {name: name in flags for name in INT8_FLAGS}
