"""The machine a step runs on: CPU features, the GPU if any, and the device a model runs on.

One home for these facts so every run records them the same way, as `machine.*` tags: timings and
INT8 results depend on the CPU's instruction sets (AVX2, AVX-512, VNNI), GPU timings on the GPU,
driver and CUDA version. torch is imported only by the functions that ask about the GPU, so
`cpu_features` (used by quantization) needs no torch.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_features() -> dict:
    """This CPU's model name, architecture and the instruction sets that decide INT8 and bf16 kernels.

    Flags come from /proc/cpuinfo (Linux); elsewhere they are reported False, which only makes
    quantization choose its most conservative x86 settings.
    """
    arch = platform.machine().lower()
    name, flags = platform.processor() or arch, set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and name in (arch, ""):
            name = value
        elif key in ("flags", "Features") and not flags:  # x86 lists "flags", ARM "Features"
            flags = set(value.split())
    return {"model_name": name, "arch": arch,
            "avx2": "avx2" in flags,
            "avx512": {"avx512f", "avx512bw"} <= flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool({"amx_bf16", "amx_int8", "amx_tile"} & flags),
            "arm64": arch in ("arm64", "aarch64")}


# The features that decide which runtime and precision is fastest and how INT8 computes: a model
# validated on a CPU that differs in any of them is re-validated (or force-promoted) elsewhere.
DECIDING_FEATURES = ("avx2", "avx512", "vnni", "avx512_bf16", "amx", "arm64")


def bf16_capable(features: dict) -> bool:
    """Native bf16 arithmetic on this CPU (AVX512_BF16 or AMX): where OpenVINO's bf16 pays off."""
    return features["avx512_bf16"] or features["amx"]


def native_mixed_precision(on_gpu: bool) -> str:
    """What `mixed_precision: auto` trains in: bf16 where the device computes it natively (a CUDA GPU
    that supports it, a CPU with AVX512_BF16 or AMX), fp16 on an older GPU, else "no" (fp32).
    Emulated bf16 costs more than it saves (measured in the README, "GPUs: where each step runs")."""
    if on_gpu:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if bf16_capable(cpu_features()) else "no"


def gpu_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or 'unknown' where it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def gpu_facts() -> dict:
    """Name, count, driver and CUDA version of the CUDA GPUs PyTorch sees; {} on a machine without."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_name": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "gpu_driver": gpu_driver(), "cuda_version": torch.version.cuda or "unknown"}


def machine_tags(threads: int | None = None) -> dict[str, str]:
    """`machine.*` tags: CPU model and features, core count, threads used, and the GPU where there is one."""
    facts = {f"cpu_{k}": v for k, v in cpu_features().items()}
    facts.update(cpu_count=os.cpu_count(), python=platform.python_version())
    if threads is not None:
        facts["threads"] = threads
    facts.update(gpu_facts() or {"gpu_name": "none"})
    return {f"machine.{k}": str(v) for k, v in facts.items()}


def peak_gpu_memory_mb(device) -> float | None:
    """Peak memory PyTorch allocated on `device` since the last reset, in MiB; None off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_gpu_memory(device) -> None:
    """Start a fresh peak for `device` (a no-op off CUDA), so each step reports its own."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident memory now, in MB (VmRSS; elsewhere its peak, the best there is)."""
    current = _status_mb("VmRSS")
    return current if current is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    On Linux, VmHWM from /proc/self/status: it starts afresh at exec. getrusage's ru_maxrss does
    not: a subprocess starts with its parent's peak, so a benchmark launched by the pipeline after
    training read the pipeline's 5.4 GB for every model. Elsewhere ru_maxrss (bytes on macOS).
    """
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)

