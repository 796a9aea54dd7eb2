"""CPU set-up of a process that runs the frozen middle: AMX tile permission, priority and torch threads.

On Linux x86-64 a process must ask the kernel for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``) before oneDNN may use AMX. The coordinator's process usually has it (torch asks at
import in the main thread), but Ray worker processes measured 10-25x slower bf16 matmuls without it on a
CPU with ``amx_bf16``: oneDNN fell back to AVX-512. Asking again is harmless, and on other CPUs or
systems the call fails and is ignored.

Ray starts its workers at nice 15 so that its own daemons stay responsive. A middle worker *is* the
compute the coordinator would otherwise run at nice 0; on cores shared with other work, nice 15 left
it a fraction of the CPU (measured 1.6x slower steps than the coordinator's own middle). So it asks
for nice 0 again (needs CAP_SYS_NICE; otherwise start the nodes with ``RAY_worker_niceness=0``).
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """Asks the kernel for AMX tile data permission; True when granted (False elsewhere, never raises)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


def reset_priority() -> int:
    """Sets every thread of this process to nice 0 (Linux niceness is per thread; threads made later
    inherit it); returns the niceness now, unchanged where that is not permitted."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except (OSError, AttributeError):
            pass
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0


def prepare_compute_process(threads: int) -> dict[str, object]:
    """AMX permission, nice 0 and an explicit torch thread count (0: leave torch's default) for this process.

    Ray sets ``OMP_NUM_THREADS`` to the actor's CPU request (often 1) in its workers, so the count is set
    here explicitly rather than inherited. Returns what was set, for the operator's status.
    """
    amx = request_amx_permission()
    nice = reset_priority()
    if threads > 0:
        torch.set_num_threads(threads)
    return {"amx_permission": amx, "nice": nice, "torch_threads": torch.get_num_threads()}
