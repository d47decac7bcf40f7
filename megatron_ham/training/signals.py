"""Preemption signals -> save what is new, exit with EXIT_REQUEUE; child processes die with us.

SIGUSR1 (Slurm's `--signal=B:USR1@N` warning, forwarded to the tasks by slurm/ham.sbatch) and
SIGTERM (scancel, node drain, torchrun shutdown) only set a flag. ham-train installs the
handlers first thing in main() -- before torch is imported -- so a signal during imports,
process-group set-up, model building, data-index building, resume, compilation, evaluation,
saving or shutdown is never fatal. The ranks agree on the flag (all-reduce MAX) at fixed points:
during set-up after each phase (nothing new to save: exit), after every training step (save the
step, exit), after the final save and before the process group is torn down. So every rank
stops at the same point even if only one got the signal, and the job exits EXIT_REQUEUE; the
sbatch script requeues it and the next run resumes from `latest`.

`die_with_parent()` makes every process forked from this one (Megatron-Core's checkpoint
writer forks one process per file bucket) get SIGKILL when its parent dies, so a rank killed
with -9 leaves no writer behind (prctl PR_SET_PDEATHSIG, Linux).

Exit codes of ham-train (documented in docs/training.md):
    0   EXIT_OK        finished train_steps
    1   uncaught error (Python traceback), or a checkpoint save that failed (message names the path)
    2   EXIT_CONFIG    bad recipe / override / command line / checkpoint dir (message names it)
    3   EXIT_NONFINITE the loss or the gradient norm became NaN/inf: stopped before saving
    75  EXIT_REQUEUE   stopped by SIGUSR1/SIGTERM (after saving anything new; EX_TEMPFAIL:
                       "try again"): requeue and resume
"""
from __future__ import annotations

import os
import signal

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_REQUEUE = 75

HANDLED = (signal.SIGUSR1, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Preempted(Exception):
    """Raised at an agreement point of the set-up when a signal arrived (nothing new to save)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase


class StopRequest:
    """Records the first preemption signal; `agreed()` is the collective decision."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopRequest":
        for s in HANDLED:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            print(f"[signal] pid {os.getpid()} got {signal.Signals(signum).name}: saving anything "
                  f"new at the next safe point, then exit {EXIT_REQUEUE}", flush=True)

    def agreed(self, device) -> int:
        """Collective: the largest signal number any rank got (0 = keep going)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def check(self, device, phase: str) -> None:
        """Collective agreement point of the set-up: raise Preempted if any rank got a signal."""
        signum = self.agreed(device)
        if signum:
            raise Preempted(signum, phase)


_parent_pid = [0]


def _remember_parent() -> None:
    _parent_pid[0] = os.getpid()


def _set_pdeathsig() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to do
        return
    if os.getppid() != _parent_pid[0]:  # the parent died before prctl took effect
        os._exit(1)


_installed = [False]


def die_with_parent() -> None:
    """From now on, every child this process forks gets SIGKILL when this process dies.

    (PR_SET_PDEATHSIG fires when the forking *thread* ends; Megatron forks its writers from the
    training thread, which lives as long as the process.) Idempotent."""
    if _installed[0] or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_set_pdeathsig)
    _installed[0] = True
