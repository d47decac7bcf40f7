"""Preemption signals -> finish the step, save, exit with EXIT_REQUEUE.

SIGUSR1 (Slurm's `--signal=B:USR1@N` warning, forwarded to the tasks by slurm/ham.sbatch) and
SIGTERM (scancel, node drain, torchrun shutdown) only set a flag. After each optimizer step the
loop all-reduces the flag (MAX) so every rank stops at the same step even if only one rank got
the signal, saves a checkpoint, and exits with EXIT_REQUEUE. The sbatch script requeues the job
on that code; the next run auto-resumes from `latest`.

Exit codes of ham-train (documented in docs/training.md):
    0   EXIT_OK        finished train_steps
    1   uncaught error (Python traceback)
    2   EXIT_CONFIG    bad recipe / override / command line (message names the key)
    75  EXIT_REQUEUE   stopped early on SIGUSR1/SIGTERM after saving a checkpoint (EX_TEMPFAIL:
                       "try again"): requeue and resume
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_REQUEUE = 75

HANDLED = (signal.SIGUSR1, signal.SIGTERM)


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
            print(f"[signal] got {signal.Signals(signum).name}: finishing this step, then "
                  f"checkpoint and exit {EXIT_REQUEUE}", flush=True)

    def agreed(self, device) -> int:
        """Collective: the largest signal number any rank got (0 = keep going)."""
        t = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
