"""Freed memory reused from one UNet step to the next: glibc's malloc settings, which take effect only when Python starts.

PyTorch's CPU tensors come from malloc. By default glibc gives each big freed block back to the OS and maps a fresh
one for the next tensor, so every step the kernel faults in and zeroes the same pages again; each thread (the panel's
worker) also gets its own arena, whose heaps are too small for a UNet's tensors. One arena, blocks under 64 MiB
from the heap (not mappings of their own), and freed space kept at the heap's top stop that. `python -m sdkit bench
--allocator` measures it (the 2-core Xeon, one SD1.5 CFG step at 512² in a worker thread). On 2026-11-27, with no
mappings at all: in bf16, 172,000 page faults and 0.54 s of system time per step became 5,000 and 0.05 s, the step
5.95 -> 5.58 s; in fp32, 755,000 faults became 12,700, the step 11.98 -> 11.12 s. On 2026-11-28, with the 64 MiB
threshold and packed convolutions (sdkit.packing): 61,800 faults became 4,600, 0.135 s of system time 0.017 s.

Written by hand because no kept library sets malloc's behaviour: jemalloc or tcmalloc would need LD_PRELOAD, and glibc
reads these tunables only at start (mallopt in a running process does not reach the arenas threads already have). So
the CLI restarts itself with them, and `make lab` starts JupyterLab with them: its kernels inherit them.
After each picture the heap's free pages go back to the OS (`trim`), so a kernel does not hold a big decode's memory.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = {
    "glibc.malloc.arena_max": "1",  # every thread allocates from the one heap, where freed blocks wait for reuse
    # blocks under 64 MiB (every tensor of an SD1.5 step at 512², a 42 MiB GEGLU the largest) come from the heap;
    # bigger ones (a VAE decode's at 1024²) keep their own mapping, given back when freed. No mapping at all
    # (mmap_max=0) let the heap fragment: SDXL at 1024² peaked at 11.3-12.1 GiB instead of 9.7-9.9
    "glibc.malloc.mmap_threshold": str(64 * 2**20),
    "glibc.malloc.trim_threshold": str(2**31 - 1),  # free space at the heap's top is kept between steps
}
OPT_OUT = "SDKIT_KEEP_MALLOC"  # set to 1: the CLI does not restart itself, glibc keeps its defaults
RESTARTED = "SDKIT_MALLOC_RESTARTED"  # set by the restart: a second start never restarts again


def applies() -> bool:
    """Whether this Python runs on glibc (Linux), whose malloc reads these tunables; elsewhere nothing is changed."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _settings(value: str) -> dict[str, str]:
    """GLIBC_TUNABLES' 'name=value:name=value' as a dict."""
    return dict(item.split("=", 1) for item in value.split(":") if "=" in item)


def active(env: dict[str, str] | None = None) -> bool:
    """Whether `env` (this process's environment, which glibc read at start) holds every one of TUNABLES."""
    found = _settings((os.environ if env is None else env).get("GLIBC_TUNABLES", ""))
    return all(found.get(name) == value for name, value in TUNABLES.items())


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with TUNABLES added to GLIBC_TUNABLES; the user's own other tunables kept."""
    env = dict(os.environ if env is None else env)
    if not applies() or env.get(OPT_OUT) == "1":
        return env
    merged = _settings(env.get("GLIBC_TUNABLES", "")) | TUNABLES
    env["GLIBC_TUNABLES"] = ":".join(f"{name}={value}" for name, value in merged.items())
    return env


def restart_with_tunables() -> None:
    """Start this same command again with TUNABLES (once; nothing is imported or done before it), where they apply."""
    if not applies() or active() or os.environ.get(OPT_OUT) == "1" or os.environ.get(RESTARTED) == "1":
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment() | {RESTARTED: "1"})
    except OSError:  # cannot start Python again (a locked-down system): run on with glibc's defaults
        pass


def in_effect() -> bool:
    """Whether this process's malloc runs with them: a 40 MiB block comes from the heap, not a mapping of its own
    (glibc's defaults map anything over 32 MiB). Read from glibc (mallinfo2), so a GLIBC_TUNABLES set after start
    does not count."""
    if not applies():
        return False
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], Info
        block = libc.malloc(40 * 2**20)
        mapped = libc.mallinfo2().hblkhd
        libc.free(block)
    except (OSError, AttributeError):  # glibc older than 2.33 has no mallinfo2: the environment is the best guess
        return active()
    return mapped < 40 * 2**20


def trim() -> None:
    """Hand the heap's free pages back to the OS (after a picture: steps reuse memory, pictures need not hold it)."""
    if applies():
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def describe() -> str:
    """One line for `python -m sdkit device`: whether freed memory is reused in this process, and how to get it."""
    if not applies():
        return "this platform's malloc keeps its own defaults (the glibc settings sdkit uses apply on Linux)"
    if in_effect():
        return ("freed blocks are reused between steps (glibc tunables set at start: one arena, blocks under 64 MiB "
                "from the heap); "
                "without them an SD1.5 step at 512² spent 0.5 s (bf16) to 2.1 s (fp32) in page faults")
    return (f"glibc's defaults: big tensors are mapped and page-faulted afresh each step (0.5 s of an SD1.5 bf16 "
            f"step at 512²); `python -m sdkit` and `make lab` start with GLIBC_TUNABLES={environment({})['GLIBC_TUNABLES']}")
