from __future__ import annotations

import os
import subprocess
import sys

from sdkit import allocator

# Three convolutions on 34 MB activations, run six times in a worker thread (as the panel's): the median page faults
# of the last four (the heap can take a run or two to settle: 8,192 faults, one activation, in a second or third run)
FAULTS = """
import resource, statistics, threading, torch
conv = lambda a, b: torch.nn.Conv2d(a, b, 3, padding=1)
net = torch.nn.Sequential(conv(4, 64), torch.nn.SiLU(), conv(64, 64), torch.nn.SiLU(), conv(64, 4)).eval()
x = torch.randn(2, 4, 256, 256)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        net(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
found = []
thread = threading.Thread(target=lambda: found.extend(faults() for _ in range(6)))
thread.start(); thread.join()
print(int(statistics.median(found[2:])))
"""


def _plain() -> dict[str, str]:
    """This environment without any glibc tunables or the opt-out."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT, allocator.RESTARTED)}


def _faults(env: dict[str, str]) -> int:
    return int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                              check=True).stdout)


def test_the_tunables_stop_fresh_page_faults_in_a_worker_thread():
    assert allocator.applies(), "this test machine runs glibc on Linux"
    defaults, tuned = _faults(_plain()), _faults(allocator.environment(_plain()))
    # 8,192 faults per 32 MiB activation in 4 KiB pages; where the kernel gives huge pages to every mapping (THP
    # "always") 16 per activation, so the check is the ratio
    assert defaults > 10 * tuned + 20, f"defaults {defaults} faults, the tunables {tuned}: the same pages serve"


def test_environment_adds_the_tunables_and_keeps_the_users_own():
    env = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4", "A": "b"})
    assert allocator.active(env) and env["A"] == "b"
    assert "glibc.malloc.tcache_count=0" in env["GLIBC_TUNABLES"] and "arena_max=4" not in env["GLIBC_TUNABLES"]
    assert not allocator.active({}) and not allocator.active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert allocator.environment({allocator.OPT_OUT: "1"}) == {allocator.OPT_OUT: "1"}, "the opt-out changes nothing"


def test_the_cli_restarts_itself_with_them_unless_told_not_to():
    def device_line(env: dict[str, str]) -> str:
        out = subprocess.run([sys.executable, "-m", "sdkit", "device"], env=env, capture_output=True, text=True,
                             check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("memory"))

    assert "freed blocks are reused" in device_line(_plain()), "restarted once, and glibc took the settings"
    kept = device_line(_plain() | {allocator.OPT_OUT: "1"})
    assert "glibc's defaults" in kept and "GLIBC_TUNABLES=glibc.malloc.arena_max=1" in kept


def test_in_effect_reads_glibc_not_the_environment():
    script = "from sdkit import allocator; print(allocator.in_effect(), allocator.active())"
    run = lambda env: subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.split()
    assert run(allocator.environment(_plain())) == ["True", "True"]
    assert run(_plain()) == ["False", "False"]
    late = ("import os; from sdkit import allocator; os.environ.update(allocator.environment()); "
            "print(allocator.in_effect(), allocator.active())")
    assert subprocess.run([sys.executable, "-c", late], env=_plain(), capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "True"], "set after start: glibc never read it"
