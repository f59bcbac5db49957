"""What a measurement ran on: package versions, device, host and git revision, recorded with every run and log."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX tiles, as torch's oneDNN
    kernels use them), and the reason in words, for `--dtype auto` and run.json."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if amx or avx:
        return True, f"the CPU computes bf16 natively ({'AMX' if amx else 'AVX512_BF16'})"
    return False, "the CPU has neither AVX512_BF16 nor AMX: bf16 would be emulated, slower than fp32"


def environment(device: torch.device) -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "specbench": pkg("specbench"),
        "torch": torch.__version__,
        "transformers": pkg("transformers"),
        "deepspeed": pkg("deepspeed"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_revision": git,
    }
