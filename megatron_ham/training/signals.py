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

`start_writer_results_queue()` starts the one process Megatron-Core *spawns* for its checkpoint
writer (a multiprocessing Manager serving the write-results queue) ignoring the stop signals and
dying with us. Slurm signals every process of a job step, torchrun its workers' process groups:
left to Megatron, that server died of the very SIGTERM / SIGUSR1 that asked for a save, and the
save failed (BrokenPipeError / EOFError, exit 1 instead of 75; seen on an H200 and on CPU).

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

    def reassert(self) -> None:
        """Install the handlers again (when installed). C code loaded lazily by the first step
        (fla / TileLang / Triton / NCCL) can set its own disposition for a signal with
        sigaction(), replacing Python's without Python noticing (signal.getsignal still answers
        ours). On an H200 (2026-12-02) SIGUSR1 sent after their first step reached none of 21
        GDN / HAM training processes while SIGTERM did; training.loop calls this after the first
        step so both stop signals are ours again."""
        for s in self._previous:
            signal.signal(s, self._handle)

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


STOP_SIGNALS = HANDLED + (signal.SIGINT,)


def _writer_server_init(parent_pid: int) -> None:
    """(in the spawned queue server) ignore the stop signals, die with the rank."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # also drops one that arrived while blocked
    _parent_pid[0] = parent_pid
    _set_pdeathsig()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_writer_manager = []  # the SyncManager serving Megatron's write-results queue (kept alive here)


def start_writer_results_queue() -> bool:
    """Start Megatron-Core's checkpoint write-results queue in a server process that ignores
    SIGTERM / SIGUSR1 / SIGINT and gets SIGKILL when this process dies; idempotent. Call before
    the first dist_checkpointing.save (checkpoint.save does). The stop signals are blocked in
    this thread while the server starts (the server inherits the mask until it ignores them), so
    one arriving then is delivered to our handler afterwards, not lost. Returns False when this
    megatron-core has no such queue (nothing to do) or it was already started by Megatron."""
    if _writer_manager:
        return True
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return False
    if getattr(fa, "_results_queue", False) is not None:  # absent (other version) or started
        return False
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))  # as Megatron starts it
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        manager.start(_writer_server_init, (os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _writer_manager.append(manager)
    fa._results_queue = manager.Queue()
    return True
