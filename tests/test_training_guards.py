"""ham-train's guards, each on a real run: real signals to real processes, real full / read-only
file systems (tmpfs mounts, root only), a real diverging run, a real forked child.

    signal during set-up (imports, data-index building) -> exit 75, nothing half-saved
    signal after the last save (shutdown)               -> never killed by it; nothing re-saved
    forked child of a rank killed with -9                -> dies too (PR_SET_PDEATHSIG)
    read-only / too small checkpoint dir                 -> exit 2 at start-up naming the path
    disk full during a save                              -> exit 1 naming the path; leftovers
                                                            removed at start-up; resume works
    model that cannot fit this machine                   -> exit 2 at start-up naming the key
    non-finite loss                                      -> exit 3 before saving over checkpoints
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_training_helpers import REPO, base_overrides, launch, logs, run, wait, write_learnable_dataset

from megatron_ham.training import checkpoint as ckpt

pytestmark = pytest.mark.slow
EXIT_NONFINITE, EXIT_REQUEUE = 3, 75


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    return write_learnable_dataset(str(tmp_path_factory.mktemp("data")))


def _ov(blend, d, *extra):
    return base_overrides(blend, d) + ["train.warmup_steps=1", "train.eval_interval=0",
                                       "checkpoint.interval=1", f"data.cache_dir={d}/cache", *extra]


def _handlers_installed(pid: int) -> bool:
    """/proc says the process catches SIGUSR1 and SIGTERM (ham-train's first act)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = int(next(l for l in f if l.startswith("SigCgt:")).split()[1], 16)
    except (OSError, StopIteration):
        return False
    return all(caught & (1 << (s - 1)) for s in (signal.SIGUSR1, signal.SIGTERM))


def _wait_for(cond, timeout=240, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _log_has(path, text):
    return lambda: os.path.exists(path) and text in open(path).read()


@contextlib.contextmanager
def _tmpfs(path: str, size: str, ro: bool = False):
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("moment,ranks", [("imports", 2), ("data-index", 1)])
def test_signal_during_setup_exits_75(blend, tmp_path, moment, ranks):
    """With 2 ranks only rank 1 gets the signal: the ranks must still agree and both exit 75."""
    d = str(tmp_path)
    procs = launch(ranks, _ov(blend, d, "train.train_steps=50"), f"{d}/log")
    _wait_for(lambda: all(_handlers_installed(p.pid) for p in procs), 120, "the signal handlers")
    if moment == "data-index":  # rank 0 writes the index cache while building it
        _wait_for(lambda: os.path.isdir(f"{d}/cache") and os.listdir(f"{d}/cache"), 240, "index building")
    procs[-1].send_signal(signal.SIGUSR1)
    assert wait(procs, 240) == [EXIT_REQUEUE] * ranks, logs(f"{d}/log", ranks)
    out = logs(f"{d}/log", ranks)
    assert "stopped by SIGUSR1 during set-up" in out or "stopped by signal" in out, out
    for _, path in ckpt.complete_checkpoints(f"{d}/checkpoints"):
        ckpt.verify_step(path)  # whatever exists is complete and verified
    assert not [n for n in os.listdir(f"{d}/checkpoints") if n.startswith(".tmp_")]


def test_signal_after_the_last_save_is_not_fatal(blend, tmp_path):
    d = str(tmp_path)
    (p,) = launch(1, _ov(blend, d, "train.train_steps=2"), f"{d}/log")
    _wait_for(_log_has(f"{d}/log.rank0", "saved step 2"), 240, "the final save")
    p.send_signal(signal.SIGTERM)
    code = p.wait(120)
    assert code in (0, EXIT_REQUEUE), (code, logs(f"{d}/log", 1))  # not -15 (killed by it)
    assert open(f"{d}/checkpoints/latest").read().strip() == "step_00000002"
    assert open(f"{d}/log.rank0").read().count("[checkpoint] saved step 2") == 1


def test_sigterm_to_every_process_of_the_job_still_saves_and_exits_75(blend, tmp_path):
    """Slurm signals every process of a job step, Megatron's checkpoint-writer helpers too: the
    save the signal asks for must still work (it failed with BrokenPipeError, exit 1)."""
    import psutil

    d = str(tmp_path)
    procs = launch(2, _ov(blend, d, "train.train_steps=500"), f"{d}/log", new_session=True)
    _wait_for(_log_has(f"{d}/log.rank0", "saved step 2"), 240, "two saves")
    helpers = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]
    assert helpers  # the writer's queue server: it must get the signal too, as under Slurm
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    assert wait(procs, 240) == [EXIT_REQUEUE] * 2, logs(f"{d}/log", 2)
    out = logs(f"{d}/log", 2)
    assert "checkpoint save failed" not in out and "exit 75 (requeue)" in out, out
    last = int(open(f"{d}/checkpoints/latest").read().strip()[5:])
    assert f"[train] stopped by signal 15 at step {last} (saved)" in out, out
    ckpt.verify_step(f"{d}/checkpoints/step_{last:08d}")


def test_kill_9_leaves_no_checkpoint_helper_behind(blend, tmp_path):
    import psutil

    d = str(tmp_path)
    (p,) = launch(1, _ov(blend, d, "train.train_steps=500"), f"{d}/log", new_session=True)
    _wait_for(_log_has(f"{d}/log.rank0", "saved step 1"), 240, "the first save")
    helpers = psutil.Process(p.pid).children(recursive=True)
    assert helpers
    p.kill()
    p.wait()

    def gone():
        return all(not h.is_running() or h.status() == psutil.STATUS_ZOMBIE for h in helpers)

    try:
        _wait_for(gone, 15, "the rank's helpers to die with it")
    finally:
        for h in helpers:
            with contextlib.suppress(psutil.Error):
                h.kill()


_FORKER = """
import multiprocessing as mp, sys, time
if sys.argv[1] == "guard":
    from megatron_ham.training.signals import die_with_parent
    die_with_parent()
child = mp.get_context("fork").Process(target=time.sleep, args=(120,))  # how Megatron forks writers
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("guard", [True, False])
def test_forked_child_dies_with_its_parent(guard):
    import psutil

    env = dict(os.environ, PYTHONPATH=REPO)
    parent = subprocess.Popen([sys.executable, "-c", _FORKER, "guard" if guard else "none"],
                              stdout=subprocess.PIPE, text=True, env=env)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()  # kill -9: no handler, no cleanup
    parent.wait()

    def gone():
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    if guard:
        _wait_for(gone, 10, "the child to die")
    else:  # the control: without the guard the child outlives its parent
        time.sleep(1.0)
        assert not gone()
        child.kill()


_CLOBBER = r"""
import ctypes, os, signal, sys, time
from megatron_ham.training.signals import StopRequest
stop = StopRequest().install()
libc = ctypes.CDLL(None)
libc.signal.restype = ctypes.c_void_p
libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.signal(signal.SIGUSR1, 1)  # SIG_IGN set in C, as a library's sigaction would: Python is not told
assert signal.getsignal(signal.SIGUSR1) == stop._handle  # Python still believes it is ours
os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)
lost = stop.signum
stop.reassert()
os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)
print(lost, stop.signum)
"""


def test_stop_handler_reasserted_after_c_code_replaced_it():
    """A disposition set in C behind Python's back loses SIGUSR1 (what the H200 runs showed);
    StopRequest.reassert() (called by the loop after the first step) makes it ours again."""
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _CLOBBER], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lost, got = map(int, out.stdout.split()[-2:])
    assert (lost, got) == (0, int(signal.SIGUSR1))


# ----------------------------------------------------------------------------- start-up checks
def test_read_only_or_small_checkpoint_dir_refused_at_start(blend, tmp_path):
    d = str(tmp_path)
    with _tmpfs(f"{d}/ro", "1m", ro=True) as ro:
        assert run(1, _ov(blend, d, f"checkpoint.dir={ro}/ck"), f"{d}/log1") == [2], logs(f"{d}/log1", 1)
        out = logs(f"{d}/log1", 1)
        assert f"checkpoint.dir {ro}/ck: not writable" in out and "Read-only" in out, out
    with _tmpfs(f"{d}/small", "2m") as small:
        assert run(1, _ov(blend, d, f"checkpoint.dir={small}"), f"{d}/log2") == [2], logs(f"{d}/log2", 1)
        out = logs(f"{d}/log2", 1)
        assert f"checkpoint.dir {small}: " in out and "MiB free, but two checkpoints need" in out, out
        assert os.listdir(small) == []  # nothing trained, nothing written


def test_disk_full_during_save_names_path_and_resume_works(blend, tmp_path):
    d = str(tmp_path)
    with _tmpfs(f"{d}/fs", "8m") as fs:
        ov = _ov(blend, d, f"checkpoint.dir={fs}", "checkpoint.keep_last=2", "train.train_steps=40")
        (p,) = launch(1, ov, f"{d}/log1")
        _wait_for(_log_has(f"{d}/log1.rank0", "saved step 1"), 240, "the first save")
        with open(f"{fs}/filler", "wb") as f:  # another job fills the disk
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            f.write(b"\0" * max(0, free - (200 << 10)))
        assert p.wait(240) == 1, logs(f"{d}/log1", 1)
        out = logs(f"{d}/log1", 1)
        assert "checkpoint save failed" in out and "no space left on device" in out, out
        assert f"{fs}/.tmp_step_" in out and "Traceback" not in out
        assert not [n for n in os.listdir(fs) if n.startswith(".tmp_")]  # removed after the failure
        last = int(open(f"{fs}/latest").read().strip()[5:])
        # the space is still taken, now by what looks like a killed save of this tool: start-up
        # must remove it before checking for room, and resume
        os.makedirs(f"{fs}/.tmp_step_00000099")
        os.rename(f"{fs}/filler", f"{fs}/.tmp_step_00000099/__0_0.distcp")
        assert run(1, ov[:-1] + [f"train.train_steps={last + 1}"], f"{d}/log2") == [0], logs(f"{d}/log2", 1)
        out = logs(f"{d}/log2", 1)
        assert "removed leftovers of interrupted saves" in out and f"resumed from {fs}/step_{last:08d}" in out
        assert not os.path.exists(f"{fs}/.tmp_step_00000099")


def test_model_that_cannot_fit_refused_at_start(blend, tmp_path):
    d = str(tmp_path)
    assert run(1, _ov(blend, d, "model.hidden_size=1000000"), f"{d}/log") == [2], logs(f"{d}/log", 1)
    out = logs(f"{d}/log", 1)
    assert "key 'model.hidden_size'" in out and "cannot fit" in out and "RAM" in out, out
    assert not os.path.exists(f"{d}/checkpoints")


# ----------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_before_saving(blend, tmp_path):
    d = str(tmp_path)
    ov = _ov(blend, d, "train.train_steps=6", "train.lr=1e30", "train.min_lr=0")
    assert run(1, ov, f"{d}/log") == [EXIT_NONFINITE], logs(f"{d}/log", 1)
    out = logs(f"{d}/log", 1)
    assert "non-finite loss or gradient norm at step 2" in out and "step_00000001 is the last checkpoint" in out
    assert sorted(n for n in os.listdir(f"{d}/checkpoints") if n.startswith("step_")) == ["step_00000001"]
    assert open(f"{d}/checkpoints/latest").read().strip() == "step_00000001"
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
