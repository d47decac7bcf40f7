"""Run ham-train (megatron_ham.train) and preempt it after a given step with a real SIGUSR1, as
Slurm does: the training tests' way to stop a run half-way from outside the trainer (it carries
no test hooks).

    python tests/_preempted.py STEP RECIPE [key=value ...]

Every rank signals itself right after optimizer step STEP; the trainer finishes that step,
saves a checkpoint and exits with 75 (EXIT_REQUEUE), as it does for a real preemption.
"""
from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ham import train as cli  # noqa: E402
from megatron_ham.training import loop  # noqa: E402


def main() -> int:
    stop_after = int(sys.argv[1])
    step = loop.train_step

    def step_then_signal(tr):
        out = step(tr)
        if tr.step == stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    loop.train_step = step_then_signal
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
