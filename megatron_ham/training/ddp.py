"""Megatron DDP with each micro-batch's small gradients added into main_grad in a few launches.

Megatron's DDP registers a hook on every parameter's gradient accumulator. For a parameter
whose weight gradient its GEMM did not already add into ``main_grad`` (gradient accumulation
fusion covers the tensor-parallel linear layers), the hook runs

    main_grad += grad          (fp32 += bf16, one elementwise kernel per parameter)

On ham_800m that is ~10 parameters per layer (norm weights, the conv, the decay's A_log and
dt_bias, the router, ...): ~220 tiny kernels per 16k micro-batch, each a Python hook and a
launch, while the GPU has little work of its own to hide them behind (docs/benchmarks.md,
"fp32 adds 222"). Here the hook only keeps (main_grad, grad); when the backward pass ends, one
callback adds them all:

    flat = cat(grad_1, ..., grad_n)            # one launch per dtype group (a few for n > 64)
    main_grad_i += float(flat)[slice_i]        # one cast, one multi-tensor add

Exactly the same sums as Megatron's hook (each element is main + float(grad), added once per
micro-batch). The batching is only used where no reduction can start before the callback runs:
during gradient accumulation (`no_sync`), or always when overlap_grad_reduce is off (the
reduction waits for finalize_model_grads). On the last micro-batch of an optimizer step with
overlap_grad_reduce on, a parameter's add happens in its hook as in Megatron, because its bucket
may start reducing as soon as its last parameter is ready.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel

__all__ = ["BatchedGradDDP", "BatchedGradAdds", "add_into"]


def add_into(mains: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
    """mains[i] += grads[i] for every i, in a few launches per (grad dtype, main dtype, device)
    group: the grads concatenated, cast once, added with one multi-tensor add."""
    groups: Dict[Tuple[torch.dtype, torch.dtype, torch.device], Tuple[list, list]] = {}
    for m, g in zip(mains, grads):
        ms, gs = groups.setdefault((g.dtype, m.dtype, m.device), ([], []))
        ms.append(m.view(-1))  # main_grad is a contiguous view into DDP's grad buffer
        gs.append(g.reshape(-1))
    for (_, main_dtype, _), (ms, gs) in groups.items():
        flat = torch.cat(gs).to(main_dtype)
        torch._foreach_add_(ms, list(flat.split([m.numel() for m in ms])))


class BatchedGradAdds:
    """The (main_grad, grad) pairs of one backward pass, added together when it ends."""

    def __init__(self):
        self.mains: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []

    def put(self, main: torch.Tensor, grad: torch.Tensor) -> None:
        if not self.mains:  # the first of this backward pass: flush when the engine finishes it
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
        self.mains.append(main)
        self.grads.append(grad)

    def flush(self) -> None:
        mains, grads = self.mains, self.grads
        self.mains, self.grads = [], []
        if mains:
            add_into(mains, grads)


class BatchedGradDDP(DistributedDataParallel):
    """megatron.core's DistributedDataParallel, its per-parameter backward hook replaced by one
    that batches the main_grad adds of a backward pass (module docstring). Everything else (the
    buckets, no_sync, the overlapped reduce-scatters, finalize) is Megatron's."""

    def __init__(self, *args, **kwargs):
        self._pending = BatchedGradAdds()  # before super().__init__, which makes the hooks
        super().__init__(*args, **kwargs)

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        from megatron.core.transformer.cuda_graphs import is_graph_capturing

        overlap = self.ddp_config.overlap_grad_reduce

        def hook(*unused):
            if is_graph_capturing():
                return
            group = self.param_to_bucket_group.get(param)
            if group is None:
                return
            grad = param.grad
            if grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
                if overlap and group.is_last_microbatch:  # its bucket may reduce right after this hook
                    param.main_grad.add_(grad.data)
                else:
                    self._pending.put(param.main_grad, grad.data)
            param.grad = None
            if overlap:
                group.register_grad_ready(param, self.force_all_reduce)

        return hook
