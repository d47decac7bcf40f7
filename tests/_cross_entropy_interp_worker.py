"""Run by tests/test_cross_entropy.py with TRITON_INTERPRET=1: our cross entropy kernels
(megatron_ham.kernels.cross_entropy) on the CPU against the op's reference and F.cross_entropy,
loss and logit gradients, on one rank and with the vocabulary split over two gloo ranks.
Prints OK at the end."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _dist import run_world
from megatron_ham.kernels.cross_entropy import BLOCK, vocab_parallel_cross_entropy_triton
from megatron_ham.ops.cross_entropy import vocab_parallel_cross_entropy

S, B, V = 5, 3, BLOCK + 37          # a vocabulary of two blocks, the second one partial


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(S, B, V, generator=g) * 4).to(dtype)
    logits[0, 0, 7] = 60.0          # a dominant logit (the max's rescaling)
    target = torch.randint(0, V, (S, B), generator=g)
    target[0, 0], target[1, 1], target[2, 2] = 7, 0, V - 1
    grad = torch.rand(S, B, generator=g)
    grad[3] = 0.0                   # masked tokens
    return logits, target, grad


def _loss_and_grad(fn, logits, target, grad):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward(grad)
    return loss.detach(), x.grad


def _check(name, a, b, tol):
    err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
    assert err < tol, (name, err)


def one_rank():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        logits, target, grad = _case(dtype)
        loss, dx = _loss_and_grad(vocab_parallel_cross_entropy_triton, logits, target, grad)
        assert loss.dtype == torch.float32 and dx.dtype == dtype and loss.shape == (S, B)
        ref, dref = _loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t, impl="reference"),
                                   logits, target, grad)
        _check(("loss", dtype), loss, ref, 1e-5)
        _check(("dlogits", dtype), dx, dref, tol)
        torch_loss = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), reduction="none")
        _check(("loss vs F.cross_entropy", dtype), loss.reshape(-1), torch_loss, 1e-5)
    # a shifted vocabulary without a group: targets outside [start, start + V) count x_t = 0
    logits, target, grad = _case(torch.float32)
    start = V // 2
    a = _loss_and_grad(lambda x, t: vocab_parallel_cross_entropy_triton(x, t, start), logits, target, grad)
    b = _loss_and_grad(lambda x, t: vocab_parallel_cross_entropy(x, t, vocab_start=start,
                                                                 impl="reference"), logits, target, grad)
    _check("shifted loss", a[0], b[0], 1e-5)
    _check("shifted dlogits", a[1], b[1], 1e-5)


def _two_ranks(rank, world):
    dist.init_process_group("gloo")
    logits, target, grad = _case(torch.float32)
    full, dfull = _loss_and_grad(lambda x, t: F.cross_entropy(
        x.reshape(-1, V), t.reshape(-1), reduction="none").view(S, B), logits, target, grad)
    cut = V // 2 + 5                # unequal halves
    lo, hi = (0, cut) if rank == 0 else (cut, V)
    for impl in ("triton", "reference"):
        fn = (lambda x, t: vocab_parallel_cross_entropy_triton(x, t, lo, dist.group.WORLD)) \
            if impl == "triton" else \
            (lambda x, t: vocab_parallel_cross_entropy(x, t, vocab_start=lo, group=dist.group.WORLD,
                                                       impl="reference"))
        loss, dx = _loss_and_grad(fn, logits[..., lo:hi].contiguous(), target, grad)
        _check((impl, rank, "loss"), loss, full, 1e-5)
        _check((impl, rank, "dlogits"), dx, dfull[..., lo:hi], 1e-5)


if __name__ == "__main__":
    one_rank()
    run_world(_two_ranks, 2)
    print("OK")
