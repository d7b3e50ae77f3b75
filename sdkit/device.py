"""Hardware: CPU ISA, cores, RAM; CUDA, ROCm, XPU, MPS; device and dtype per component, with reasons."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import psutil
import torch

COMPONENTS = ("unet", "text_encoder", "vae")
ISA_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "avx512f": "AVX512", "avx2": "AVX2"}


@dataclass(frozen=True)
class Choice:
    """Where and in which precision one component runs, and why."""

    device: str
    dtype: str
    reason: str
    layout: str = "channels_last"  # of convolution weights and activations on a CPU (sdkit.optimize); or contiguous
    backend: str = "pytorch"  # what runs it: PyTorch, or for a CPU's UNet "openvino" (sdkit.openvino_unet)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype object for `dtype`."""
        return getattr(torch, self.dtype)


@dataclass
class DeviceReport:
    """What this machine has, and what sdkit picks for each model component."""

    cpu: str
    cores: int
    threads: int
    ram_gib: float
    isa: list[str]
    accelerator: str
    accelerator_name: str
    torch_version: str
    choices: dict[str, Choice] = field(default_factory=dict)

    @property
    def cpu_has_bf16(self) -> bool:
        """True when the CPU has native bf16 units (AMX or AVX512-BF16)."""
        return "AMX-BF16" in self.isa or "AVX512-BF16" in self.isa

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"CPU          {self.cpu}",
            f"cores        {self.cores} physical, {self.threads} logical; torch uses {torch.get_num_threads()} threads",
            f"RAM          {self.ram_gib:.1f} GiB",
            f"ISA          {', '.join(self.isa) or 'none of AMX/AVX512/AVX2'}",
            f"accelerator  {self.accelerator}" + (f" ({self.accelerator_name})" if self.accelerator_name else ""),
            f"torch        {self.torch_version}",
        ]
        for name, choice in self.choices.items():
            layout = f" {choice.layout.replace('_', '-')}" if choice.device == "cpu" and name != "text_encoder" else ""
            if choice.backend == "openvino":
                layout = " in OpenVINO"
            lines.append(f"{name:<12} {choice.device} {choice.dtype}{layout}: {choice.reason}")
        if self.accelerator == "none":
            from sdkit import allocator, fusion, packing

            lines.append(f"memory       {allocator.describe()}")
            lines.append(f"convolution  {packing.describe()}")
            lines.append(f"fusion       {fusion.describe()}")
        if self.accelerator == "none" and not any("measured here" in c.reason for c in self.choices.values()):
            lines.append("speed        guessed from the CPU's features, not measured yet: `python -m sdkit device "
                         "--measure` times each precision and layout (and OpenVINO, where installed) here (about a minute) "
                         "and keeps the fastest")
        return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU's marketing name, from the OS."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _isa() -> list[str]:
    """The matmul-relevant ISA extensions of this CPU, best first."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    else:  # not Linux: ask torch, which probes CPUID itself
        if torch.cpu._is_amx_tile_supported():
            flags.add("amx_bf16")
        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
        capability = torch.backends.cpu.get_cpu_capability()
        if "AVX512" in capability:
            flags.update({"avx512f", "avx2"})
        elif "AVX2" in capability:
            flags.add("avx2")
    return [label for flag, label in ISA_FLAGS.items() if flag in flags]


def _accelerator() -> tuple[str, str]:
    """The first usable accelerator: ('cuda'|'rocm'|'xpu'|'mps'|'none', its name)."""
    if torch.cuda.is_available():
        kind = "rocm" if torch.version.hip else "cuda"
        return kind, torch.cuda.get_device_name(0)
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu", torch.xpu.get_device_name(0)
    if torch.backends.mps.is_available():
        return "mps", "Apple GPU"
    return "none", ""


def component_of(part: str) -> str:
    """Which per-component choice (unet, text_encoder, vae) a model part runs with: text_encoder_2 is a text encoder."""
    return part if part in ("unet", "vae") else "text_encoder"


def choose(report: DeviceReport) -> dict[str, Choice]:
    """Pick device and dtype for each component, with a reason a learner can read."""
    forced = os.environ.get("SDKIT_DTYPE")
    if report.accelerator in ("cuda", "rocm", "xpu"):
        device = "cuda" if report.accelerator in ("cuda", "rocm") else "xpu"
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if device == "cuda" else True
        dtype = "bfloat16" if bf16 else "float16"
        why = f"{report.accelerator} GPU: half precision halves memory and uses its tensor units"
        choices = {c: Choice(device, dtype, why) for c in ("unet", "text_encoder")}
        choices["vae"] = Choice(device, "float32", "VAE stays fp32: the SDXL VAE overflows to NaN in fp16")
    elif report.accelerator == "mps":
        why = "Apple GPU: fp16 is its fast path"
        choices = {c: Choice("mps", "float16", why) for c in ("unet", "text_encoder")}
        choices["vae"] = Choice("mps", "float32", "VAE stays fp32: the SDXL VAE overflows to NaN in fp16")
    elif report.cpu_has_bf16:
        units = "AMX" if "AMX-BF16" in report.isa else "AVX512-BF16"
        why = f"bf16: this CPU has {units} units, so bf16 matmuls run several times faster than fp32"
        choices = {c: Choice("cpu", "bfloat16", why) for c in ("unet", "text_encoder")}
        choices["vae"] = Choice("cpu", "bfloat16", f"bf16 VAE: decoding runs several times faster on {units}; bf16 keeps "
                                "fp32's range, so no NaN (fp16's problem); `python -m sdkit bench` compares its "
                                "pictures with fp32 (PSNR). SDKIT_DTYPE=float32 decodes in fp32")
    else:
        why = "fp32: this CPU has no bf16 units (AMX or AVX512-BF16), so bf16 would be emulated and slower"
        choices = {c: Choice("cpu", "float32", why) for c in COMPONENTS}
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            from sdkit.errors import SdkitError

            raise SdkitError(f"SDKIT_DTYPE={forced!r} is not a dtype sdkit uses.",
                             fix="set it to float32, bfloat16 or float16, or unset it")
        choices = {c: replace(ch, dtype=forced, reason=f"{forced}: set by SDKIT_DTYPE") for c, ch in choices.items()}
    if report.accelerator == "none":
        choices = _measured(report, choices, forced=bool(forced))
    backend = os.environ.get("SDKIT_BACKEND")
    if backend:
        choices["unet"] = _forced_backend(backend, choices["unet"])
    return choices


def _forced_backend(backend: str, choice: Choice) -> Choice:
    """The UNet's choice with the engine SDKIT_BACKEND names (pytorch, or openvino on a CPU where it is installed)."""
    from sdkit import openvino_unet
    from sdkit.errors import SdkitError

    if backend not in ("pytorch", "openvino"):
        raise SdkitError(f"SDKIT_BACKEND={backend!r} is not an engine sdkit runs the UNet with.",
                         fix="set it to pytorch or openvino, or unset it (then a measurement decides)")
    if backend == "openvino" and choice.device != "cpu":
        raise SdkitError("SDKIT_BACKEND=openvino: sdkit runs the UNet in OpenVINO on CPUs only, and this machine "
                         f"runs it on its {choice.device} GPU.", fix="unset SDKIT_BACKEND, or set it to pytorch")
    if backend == "openvino" and not openvino_unet.installed():
        raise SdkitError("SDKIT_BACKEND=openvino cannot run here: the openvino package is not installed.",
                         fix="pip install openvino, or unset SDKIT_BACKEND")
    return replace(choice, backend=backend, reason=f"{choice.reason}; {backend}: set by SDKIT_BACKEND")


def _measured(report: DeviceReport, guesses: dict[str, Choice], *, forced: bool = False) -> dict[str, Choice]:
    """The CPU-feature guesses, or the measured pick where `python -m sdkit device --measure` found a faster one:
    its precision for every part and its memory layout for the UNet, both from PyTorch's times (the VAE's larger
    convolutions keep channels-last), then OpenVINO for the UNet where it beat that. With the precision `forced`
    (SDKIT_DTYPE), only the way is picked, among that precision's candidates."""
    from sdkit import speed

    measurement = speed.load(report)
    if measurement is not None and forced:
        measurement = measurement.only(dtype=guesses["unet"].dtype)
    if measurement is None:
        return guesses
    unet = guesses["unet"]
    dtype, layout, way = measurement.choose(dtype=unet.dtype, layout=unet.layout)
    line = measurement.describe(guess=(unet.dtype, unet.layout), picked=(dtype, way))
    choices = {}
    for name, guess in guesses.items():
        reason = f"{guess.reason}; {line}" if dtype == guess.dtype else f"the CPU's features suggest {guess.dtype}; {line}"
        backend = "openvino" if name == "unet" and way == speed.OPENVINO else "pytorch"
        choices[name] = replace(guess, dtype=dtype, reason=reason, layout=layout if name == "unet" else guess.layout,
                                backend=backend)
    return choices


@lru_cache(maxsize=1)
def report() -> DeviceReport:
    """Detect this machine once and return what it has and what sdkit picks."""
    accelerator, name = _accelerator()
    result = DeviceReport(
        cpu=_cpu_name(),
        cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        threads=os.cpu_count() or 1,
        ram_gib=psutil.virtual_memory().total / 2**30,
        isa=_isa(),
        accelerator=accelerator,
        accelerator_name=name,
        torch_version=torch.__version__,
    )
    result.choices = choose(result)
    return result


def return_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps big freed blocks otherwise)."""
    import gc

    from sdkit import allocator

    gc.collect()
    allocator.trim()  # malloc_trim where glibc runs; other platforms' allocators give memory back themselves


def matmul_gflops(*, dtype: str = "float32", size: int = 1024, repeats: int = 5, seconds: float = 0.0,
                  shape: tuple[int, int, int] | None = None) -> float:
    """Measured GFLOP/s of a size x size matmul (or an (m, k, n) `shape`) in `dtype` on the CPU: the best of at least
    `repeats` calls, repeated until `seconds` have passed."""
    import time

    m, k, n = shape or (size, size, size)
    a = torch.randn(m, k, dtype=getattr(torch, dtype))
    b = torch.randn(k, n, dtype=getattr(torch, dtype))
    a @ b  # warm-up: first call allocates and picks kernels
    best, began, done = float("inf"), time.perf_counter(), 0
    while done < repeats or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        done += 1
    return 2 * m * k * n / best / 1e9


BYTES_PER_PARAMETER = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "gguf_q4": 0.5625}

# Parameter counts (millions) of the parts of well-known model families, from their published weights.
KNOWN_MODELS: dict[str, dict[str, float]] = {
    "SD1.5": {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7},
    "SDXL": {"unet": 2567.5, "text_encoder": 123.1 + 694.7, "vae": 83.7},
    "FLUX.1": {"transformer": 11901.4, "text_encoder": 123.1 + 4762.3, "vae": 83.8},
}


def memory_table(*, dtypes: tuple[str, ...] = ("float32", "bfloat16", "fp8", "gguf_q4")) -> list[dict[str, object]]:
    """GiB the weights of each known model need in each dtype (the VAE kept fp32), and whether they fit in RAM."""
    ram = report().ram_gib
    rows = []
    for model, parts in KNOWN_MODELS.items():
        row: dict[str, object] = {"model": model, "parameters (B)": round(sum(parts.values()) / 1000, 2)}
        for dtype in dtypes:
            gib = sum(
                n * 1e6 * (4.0 if part == "vae" else BYTES_PER_PARAMETER[dtype]) for part, n in parts.items()
            ) / 2**30
            row[dtype] = f"{gib:.1f} GiB" + ("" if gib < 0.8 * ram else " (too big here)")
        rows.append(row)
    return rows
