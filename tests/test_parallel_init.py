"""megatron_ham.distributed.initialize from Slurm variables, idempotency, bad arguments."""
from __future__ import annotations

import os
import subprocess
import sys

from _dist import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import warnings; warnings.filterwarnings("ignore")
import torch
from megatron_ham import distributed as D
info = D.initialize(tp=1, pp=1, seed=5)
assert (info.rank, info.world_size, info.local_rank, info.dp, info.backend) == (0, 1, 0, 1, "gloo"), info
assert D.initialize(tp=1, pp=1, seed=5).world_size == 1  # idempotent
for bad, name in [(dict(tp=0), "tp"), (dict(tp=1, pp=-1), "pp"), (dict(tp=2), "tp\\*pp"),
                  (dict(backend="mpi"), "backend")]:
    try:
        D.initialize(**bad)
    except ValueError as e:
        import re
        assert re.search(name, str(e)), (bad, e)
    else:
        raise AssertionError(f"initialize({bad}) did not raise")
from megatron_ham.cpu_shims import install_model_parallel_shims
assert install_model_parallel_shims() is True
from megatron.core import tensor_parallel
with tensor_parallel.get_cuda_rng_tracker().fork():
    a = torch.rand(3)
with tensor_parallel.get_cuda_rng_tracker().fork():
    b = torch.rand(3)
assert not torch.equal(a, b)  # the forked stream advances
D.destroy()
print("OK")
"""


def test_initialize_from_slurm_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", MASTER_PORT=str(free_port()),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
