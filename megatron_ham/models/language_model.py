"""The language model: megatron-core's GPTModel with the loss of megatron_ham.ops.

Only the loss differs: :meth:`HAMLanguageModel.compute_language_model_loss` runs
``ops.vocab_parallel_cross_entropy`` (our Triton kernels on the GPU, its PyTorch reference
elsewhere) in place of megatron-core's cross entropy. Same math, same per-token losses ``[b, s]``;
the parameters, the forward and the checkpoint keys are GPTModel's.
"""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_ham.ops.cross_entropy import vocab_parallel_cross_entropy


class HAMLanguageModel(GPTModel):
    """GPTModel whose loss is ``ops.vocab_parallel_cross_entropy`` (``loss_impl``: its impl,
    "auto" or "reference")."""

    def __init__(self, *args, loss_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl

    def compute_language_model_loss(self, labels, logits):
        """labels [b, s], logits [s, b, V / tp] (this rank's ids of the vocabulary) -> loss fp32 [b, s]."""
        tp = self.pg_collection.tp
        V = logits.shape[-1]
        loss = vocab_parallel_cross_entropy(  # [s, b]
            logits, labels.transpose(0, 1), vocab_start=tp.rank() * V, group=tp, impl=self.loss_impl)
        return loss.transpose(0, 1).contiguous()
