"""What the OS says about this machine's CPU: its model name, its instruction-set flags and its cache sizes.

The fast paths are chosen from these facts (bf16 where the CPU computes it natively, the retrieval tile from
the caches); every function takes the facts as arguments too, so the choices are tested for CPUs other than
the one running the tests. No torch import: the bundle's path uses this module.
"""

from __future__ import annotations

import functools
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cxrclip.exceptions import ConfigError

log = logging.getLogger(__name__)

# Native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = (
    "the image encoder's precision; auto = bf16 only for a model calibrated under bf16 on a CPU with native bf16, "
    "else fp32"
)


@dataclass(frozen=True)
class CpuInfo:
    """One CPU's facts. Cache sizes are bytes, ``None`` where the OS does not say."""

    model: str = "unknown"
    flags: frozenset[str] = field(default_factory=frozenset)
    l2_bytes: int | None = None  # per core
    l3_bytes: int | None = None  # shared

    @property
    def vendor(self) -> str:
        name = self.model.lower()
        return "amd" if "amd" in name or "epyc" in name or "ryzen" in name else "intel" if "intel" in name else "other"

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    def describe(self) -> str:
        mb = lambda b: "?" if b is None else f"{b / 2**20:g} MB"  # noqa: E731
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.model} (L2 {mb(self.l2_bytes)}/core, L3 {mb(self.l3_bytes)}, {bf16})"


def _size(text: str) -> int | None:
    """``512K`` / ``32768K`` / ``2M`` (sysfs) → bytes."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        return None


def read_cpuinfo(cpuinfo: str, cache_dir: Path | None = None) -> CpuInfo:
    """Facts from the text of ``/proc/cpuinfo`` and a ``/sys/devices/system/cpu/cpu0/cache`` folder."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or "unknown"
    flags = frozenset(fields.get("flags", "").split())
    caches: dict[int, int] = {}
    if cache_dir is not None and cache_dir.is_dir():
        for index in sorted(cache_dir.glob("index*")):
            try:
                level = int((index / "level").read_text())
                kind = (index / "type").read_text().strip()
                size = _size((index / "size").read_text())
            except (OSError, ValueError):
                continue
            if kind != "Instruction" and size:
                caches[level] = size
    return CpuInfo(model=model, flags=flags, l2_bytes=caches.get(2), l3_bytes=caches.get(3))


@functools.cache
def this_cpu() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return read_cpuinfo(text, Path("/sys/devices/system/cpu/cpu0/cache"))


def cpu_has_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere it is emulated and slower."""
    return this_cpu().native_bf16


def native_bf16(device="cpu", cpu: CpuInfo | None = None) -> bool:
    """Whether ``device`` computes bf16 natively: a CPU with AVX512-BF16 or AMX, a CUDA GPU that supports it."""
    if str(device).split(":")[0] == "cuda":
        torch = sys.modules.get("torch")  # a CUDA device means torch is loaded; this module stays torch-free
        return bool(torch is not None and torch.cuda.is_bf16_supported())
    return (cpu or this_cpu()).native_bf16


def resolve_precision(precision: str | None, device="cpu", cpu: CpuInfo | None = None, calibrated: str | None = None):
    """The image encoder's inference precision. A calibration is valid for the precision it was fitted under
    (``calibrated``: its ``fitted_on.precision``; None for one fitted before this was recorded, i.e. fp32): bf16
    autocast moved the demo's fp32-calibrated probabilities by up to 0.17 (20 of 2,600 decisions changed, issue 27)
    — a steep Platt curve turns the small embedding error into a large probability error. So ``auto`` is bf16 only
    where the calibration was fitted under bf16 and the device computes it natively, else fp32. ``bf16`` asked for
    is kept, with a warning when it is emulated or when the calibration was fitted under fp32. ``device``: a name
    (``cpu``, ``cuda:1``) or a torch device."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if calibrated == "bf16" and native_bf16(device, cpu) else "fp32"
    if precision == "bf16" and not native_bf16(device, cpu):
        log.warning("precision bf16 on %s without native bf16: emulated, slower than fp32", device)
    if calibrated is not None and calibrated != precision:
        log.warning("precision %s, but the calibration was fitted under %s: probabilities near a threshold may move; "
                    "calibrate under the precision that answers (cxrclip calibrate --precision)", precision,
                    calibrated)  # fmt: skip
    return precision
