"""CPU set-up of a process that runs the frozen middle: AMX tile permission and torch threads.

On Linux x86-64 a process must ask the kernel for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``) before oneDNN may use AMX. The coordinator's process usually has it (torch asks at
import in the main thread), but Ray worker processes measured 10-25x slower bf16 matmuls without it on a
CPU with ``amx_bf16``: oneDNN fell back to AVX-512. Asking again is harmless, and on other CPUs or
systems the call fails and is ignored.
"""

from __future__ import annotations

import ctypes
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


def prepare_compute_process(threads: int) -> dict[str, object]:
    """AMX permission and an explicit torch thread count (0: leave torch's default) for this process.

    Ray sets ``OMP_NUM_THREADS`` to the actor's CPU request (often 1) in its workers, so the count is set
    here explicitly rather than inherited. Returns what was set, for the operator's status.
    """
    amx = request_amx_permission()
    if threads > 0:
        torch.set_num_threads(threads)
    return {"amx_permission": amx, "torch_threads": torch.get_num_threads()}
