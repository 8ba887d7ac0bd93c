"""The machine a measurement ran on: timings and kernel choices are only comparable within one CPU."""
import os
from pathlib import Path


def cpu():
    """{"model", "flags" (the vector extensions that decide kernel speed), "cores"} of this machine."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in field("flags").split()]
    return {"model": field("model name") or "unknown", "flags": flags, "cores": os.cpu_count()}
