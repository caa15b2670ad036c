"""How many CPU threads torch, llama.cpp and onnxruntime use: the cores this process may use,
less the ones other processes keep busy, looked at again as a run goes on.

Why not "all cores": a torch op on CPU is split over an OpenMP team that meets at a barrier
after the op, so when another process holds one of the cores, every op waits for the thread
that lost it. Measured on a 2-core VM (``edgeqlora train max_steps=2 eval_examples=4``, same
numbers to the digit every time): idle, 2 threads 41-46 s and 1 thread 50 s; with one core kept
busy by another process, 2 threads 138 s and 1 thread 50 s. OpenMP's passive wait
(``OMP_WAIT_POLICY=PASSIVE``) helps less under load (58 s) and costs the idle run 1.6x (71-73 s:
every op then wakes sleeping threads), so it is not set; the thread count is what adapts.

The policy:

- the cores: ``os.sched_getaffinity`` (``taskset``, cgroup cpusets), capped by a cgroup v2 CPU
  quota (``cpu.max``, containers);
- how busy they are: ``/proc/stat`` for those cores, less this process's own CPU time, over the
  time since the last look (at least ``WINDOW_S``); a core counts as taken when other processes
  use more than 70 % of one;
- torch: one thread per free core, re-checked at most every ``RECHECK_S`` seconds by the loops
  that call :func:`adapt` (a training step, an evaluation batch, an export stage), so a job that
  starts on the machine halfway through a run is noticed;
- llama.cpp / onnxruntime (:func:`runtime_threads`): the free cores, and never the last one
  (their decode is memory-bound; see ``runtimes.base``), chosen when a model is loaded;
- ``EDGEQLORA_THREADS`` or a command's ``--threads`` (:func:`set_override`) fixes both;
  ``EDGEQLORA_THREADS=static`` gives the counts from before this policy whatever the load
  (torch and the quantizers every core, llama.cpp / onnxruntime all but one: ``bench/busy.py``
  compares the two); ``OMP_NUM_THREADS``, when set, caps torch's count. The first choice is printed once, and every
  change after it.

Linux-only measurements; elsewhere (no ``/proc/stat``) every core counts as free. Torch-free:
torch is driven through ``sys.modules`` when something else has imported it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .config import env_number
from .errors import InputError

WINDOW_S = 0.25  # the shortest look at /proc/stat
RECHECK_S = 5.0  # how often adapt() looks again
TAKEN = 0.7  # other processes' use of a core above which it is not ours


@dataclasses.dataclass
class _Snapshot:
    wall: float
    busy: float  # seconds of non-idle time summed over the allowed cores (None: unknown)
    own: float  # this process's CPU seconds


_state: dict = {"override": None, "last": None, "free": None, "torch": None, "checked": 0.0,
                "printed": False, "changes": 0}


def set_override(n: int | None) -> None:
    """A command's ``--threads``: every count below is ``n`` (None: back to the policy)."""
    if n is not None and int(n) < 1:
        raise InputError(f"--threads {n} must be >= 1 (leave it out for the default)")
    _state["override"] = None if n is None else int(n)


def static() -> bool:
    """``EDGEQLORA_THREADS=static``: the fixed counts, no look at the load."""
    return _state["override"] is None and \
        os.environ.get("EDGEQLORA_THREADS", "").strip().lower() == "static"


def override() -> int | None:
    """``--threads`` if given, else ``EDGEQLORA_THREADS``, else None."""
    if _state["override"] is not None:
        return _state["override"]
    if os.environ.get("EDGEQLORA_THREADS", "").strip().lower() == "static":
        return None
    return env_number("EDGEQLORA_THREADS", int, 1, None, "an integer (or static)")


def available() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = _allowed()
        cores = len(cpus)
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 0.5)))
    return max(1, cores)


def _allowed() -> set[int]:
    return os.sched_getaffinity(0)


def _cgroup_quota() -> float | None:
    """Cores granted by cgroup v2's ``cpu.max`` ("max 100000" means no limit), if any."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _proc_stat_busy() -> float | None:
    """Non-idle seconds summed over the allowed cores since boot (user, nice, system, irq,
    softirq, steal: a hypervisor's steal is a core we do not get), or None off Linux."""
    try:
        allowed = _allowed()
        lines = Path("/proc/stat").read_text().splitlines()
    except (OSError, AttributeError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu not in allowed:
            continue
        f = [int(x) for x in rest.split()]
        total += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return total / ticks


def _snapshot() -> _Snapshot:
    t = os.times()
    return _Snapshot(time.monotonic(), _proc_stat_busy(), t.user + t.system)


# The first look starts when the module is imported (the process's own start-up is its own CPU
# time), so the first question seldom waits.
_state["last"] = _snapshot()


def others_busy(before: _Snapshot, after: _Snapshot) -> float:
    """Cores' worth of CPU that other processes used between two snapshots."""
    span = after.wall - before.wall
    if before.busy is None or after.busy is None or span <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / span


def free_cores(sample: Callable[[], _Snapshot] = _snapshot) -> int:
    """Allowed cores less those other processes keep busy, since the last look (at least 1);
    within ``RECHECK_S`` of a look, that look's answer. The first look waits ``WINDOW_S``.
    ``--threads`` / ``EDGEQLORA_THREADS`` win."""
    fixed = override()
    if fixed is not None:
        return fixed
    if static():
        return available()
    last = _state["last"]
    if last is None:
        last = _state["last"] = sample()
    elif _state["free"] is not None and time.monotonic() - last.wall < RECHECK_S:
        return _state["free"]  # looked recently: a quantizer asks once per tensor
    if time.monotonic() - last.wall < WINDOW_S:
        time.sleep(WINDOW_S - (time.monotonic() - last.wall))
    now = sample()
    taken = others_busy(last, now)
    _state["last"] = now
    cores = available()
    _state["free"] = max(1, min(cores, cores - math.floor(taken + (1 - TAKEN))))
    return _state["free"]


def torch_threads() -> int:
    """The torch intra-op thread count the policy gives now."""
    n = override()
    if n is not None:
        return n
    n = free_cores()
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        n = min(n, int(cap))
    return n


def runtime_threads() -> int:
    """Threads for llama.cpp / onnxruntime when a model is loaded: the free cores, but never
    the last core of the machine (``EDGEQLORA_THREADS`` / ``--threads`` override)."""
    n = override()
    if n is not None:
        return n
    if static():
        return max(1, available() - 1)
    return max(1, min(available() - 1, free_cores()))


def adapt(say: Callable[[str], None] | None = None, force: bool = False) -> int | None:
    """Set torch's thread count from the policy, at most every ``RECHECK_S`` seconds (``force``:
    now). Does nothing until torch is imported. Prints the first choice and every change (to
    ``say``, else stdout). Returns the count, or None when torch is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    now = time.monotonic()
    if not force and _state["torch"] is not None and now - _state["checked"] < RECHECK_S:
        return _state["torch"]
    _state["checked"] = now
    n = torch_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    previous = _state["torch"]
    _state["torch"] = n
    # stdout: stderr is where a failing command writes its one line.
    out = say or (lambda line: print(line, flush=True))
    if not _state["printed"]:
        _state["printed"] = True
        out(f"threads: {describe(n)}")
    elif previous != n:
        _state["changes"] += 1
        why = "another process took a core" if n < previous else "a core came free"
        out(f"threads: torch {previous} -> {n} ({why})")
    return n


def describe(n: int) -> str:
    """One line of why ``n`` threads."""
    cores = available()
    if override() is not None or static():
        return f"{n} (set by --threads / EDGEQLORA_THREADS; {cores} cores available)"
    free = _state["free"] or cores
    why = f"{cores - free} busy with other processes" if free < cores else "none busy"
    return (f"torch {n} of {cores} cores ({why}; llama.cpp / onnxruntime get "
            f"{max(1, min(cores - 1, free))}; --threads or EDGEQLORA_THREADS fixes it)")


def summary() -> dict:
    """For a run's record: the thread count torch ran with last and how often it changed."""
    return {"torch": _state["torch"], "changes": _state["changes"], "cores": available()}


def reset() -> None:
    """Forget every look and choice (tests; a long-lived process starting a new job)."""
    _state.update(override=None, last=None, free=None, torch=None, checked=0.0, printed=False,
                  changes=0)
