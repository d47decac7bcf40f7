"""SDPACoreAttention with packed documents: one call per row, one call per document, or the
block-diagonal mask (above MAX_DOCUMENT_CALLS) all equal attention under the block-diagonal
causal mask written out below (outputs and gradients; real megatron-core, one gloo process).
On the GPU (`gpu` mark): the per-document calls at 16k in bf16, with every sdpa_backend, equal the
mask path in fp32."""
from __future__ import annotations

import math

import pytest
import torch

from _dist import run_world


def _reference(q, k, v, cu, b, s, scale):
    """softmax(q k^T * scale + block-diagonal causal mask) v, in float64; q/k/v [s, b, n, d]."""
    doc = torch.searchsorted(torch.tensor(cu[1:]), torch.arange(b * s), right=True).reshape(b, s)
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    qd, kd, vd = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))          # [b, n, s, d]
    scores = (qd @ kd.transpose(-1, -2)) * scale                               # [b, n, s, s]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(-1) @ vd                                              # [b, n, s, d]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _worker(rank, world):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ham import distributed as D
    from megatron_ham.layers import SDPACoreAttention, sdpa_attention
    from megatron_ham.models import ModelConfig
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=3)
    s, b, n, d = 24, 2, 4, 8
    tc = transformer_config(ModelConfig(architecture="transformer", num_layers=1, hidden_size=32,
                                        num_attention_heads=n, num_query_groups=n, seq_length=s,
                                        vocab_size=64, make_vocab_size_divisible_by=64, dtype="fp32",
                                        use_cpu_initialization=True))
    attn = SDPACoreAttention(tc, 1, AttnMaskType.causal, "self",
                             pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    g = torch.Generator().manual_seed(0)
    cases = {  # name: (s, b, cu)
        "one document per row": (s, b, [0, 24, 48]),
        # a one-token document, uneven rows; every window runs past the row: padded
        "documents per call": (s, b, [0, 5, 6, 17, 24, 25, 48]),
        # windows of 128, 128 and 256 tokens: two views of the row (over the next document's
        # tokens), the last one padded
        "documents on windows": (300, 1, [0, 100, 130, 300]),
        "many documents (mask)": (s, b, [0, *range(3, 48, 3), 48]),
    }
    for name, (s, b, cu) in cases.items():
        q, k, v = (torch.randn(s, b, n, d, generator=g, requires_grad=True) for _ in range(3))
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                              cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32), max_seqlen_q=s,
                              max_seqlen_kv=s)
        limit = sdpa_attention.MAX_DOCUMENT_CALLS
        if name == "many documents (mask)":
            sdpa_attention.MAX_DOCUMENT_CALLS = 8  # 16 documents: over the limit
        try:
            out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=psp)
        finally:
            sdpa_attention.MAX_DOCUMENT_CALLS = limit
        # only the last path builds the [b, 1, s, s] mask
        assert hasattr(psp, "_ham_sdpa_mask") == (name == "many documents (mask)"), name
        ref = _reference(q, k, v, cu, b, s, 1.0 / math.sqrt(d))
        assert out.shape == (s, b, n * d)
        assert torch.allclose(out.double(), ref, atol=1e-5), (name, (out.double() - ref).abs().max())
        dout = torch.randn(s, b, n * d, generator=g)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = torch.autograd.grad(ref, (q, k, v), dout.double())
        for x, y, which in zip(got, want, "qkv"):
            assert torch.allclose(x, y, atol=1e-5), (name, f"d{which}", (x - y).abs().max())

    # without the causal mask a document is attended on its own slice, never on a window
    q, k, v = (torch.randn(300, 1, n, d, generator=g) for _ in range(3))
    two = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 100, 300], dtype=torch.int32),
                          cu_seqlens_kv=torch.tensor([0, 100, 300], dtype=torch.int32), max_seqlen_q=300,
                          max_seqlen_kv=300)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask, packed_seq_params=two)
    for a, e in ((0, 100), (100, 300)):
        alone = attn(q[a:e], k[a:e], v[a:e], None, attn_mask_type=AttnMaskType.no_mask)
        assert torch.allclose(out[a:e], alone, atol=1e-6), (a, e)
    q, k, v = (torch.randn(s, b, n, d, generator=g, requires_grad=True) for _ in range(3))

    # model.sdpa_backend picks the CUDA kernel; on CPU it changes nothing
    cudnn = SDPACoreAttention(tc, 1, AttnMaskType.causal, "self",
                              pg_collection=ProcessGroupCollection.use_mpu_process_groups(), sdpa_backend="cudnn")
    assert torch.equal(cudnn(q, k, v, None, packed_seq_params=psp), attn(q, k, v, None, packed_seq_params=psp))
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        SDPACoreAttention(tc, 1, AttnMaskType.causal, "self", sdpa_backend="fa3")
    from megatron_ham.models.config import SettingError

    with pytest.raises(SettingError, match="sdpa_backend"):
        ModelConfig(architecture="transformer", num_layers=1, hidden_size=32, num_attention_heads=n,
                    sdpa_backend="flash3").validate()

    bad = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 30, 48], dtype=torch.int32),
                          cu_seqlens_kv=torch.tensor([0, 30, 48], dtype=torch.int32), max_seqlen_q=s,
                          max_seqlen_kv=s)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=bad)


def test_sdpa_documents_equal_the_block_diagonal_mask():
    run_world(_worker, 1)


def test_document_windows_come_in_few_lengths_and_cost_at_most_an_eighth_more():
    from megatron_ham.layers.sdpa_attention import WINDOW_MIN_STEP, window_length

    lengths = [window_length(n) for n in range(1, 16385)]
    assert all(w >= n for n, w in enumerate(lengths, 1))
    assert lengths == sorted(lengths) and lengths[-1] == 16384
    assert len(set(lengths)) == 40
    assert all(w % WINDOW_MIN_STEP == 0 for w in lengths)
    assert max(w / n for n, w in enumerate(lengths, 1) if n > 8 * WINDOW_MIN_STEP) <= 1.125
    assert window_length(1024) == 1024 and window_length(1025) == 1152 and window_length(8193) == 9216


def _gpu_worker(rank, world):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ham import distributed as D
    from megatron_ham.layers import SDPACoreAttention, sdpa_attention
    from megatron_ham.models import ModelConfig
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=3)
    s, n, d = 16384, 12, 128                      # the 800M recipes' attention at 16k
    tc = transformer_config(ModelConfig(architecture="transformer", num_layers=1, hidden_size=n * d,
                                        num_attention_heads=n, seq_length=s, vocab_size=64,
                                        make_vocab_size_divisible_by=64, dtype="bf16"))
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(s, 1, n, d, generator=g, device="cuda").bfloat16() for _ in range(3))
    dout = torch.randn(s, 1, n * d, generator=g, device="cuda").bfloat16()
    cu = torch.tensor([0, 5003, 5004, 12000, s], dtype=torch.int32, device="cuda")
    results = []
    runs = [(torch.bfloat16, 64, kernel) for kernel in ("auto", "cudnn", "flash", "efficient")]
    for dtype, limit, kernel in runs + [(torch.float32, 0, "auto")]:  # per document / the mask
        attn = SDPACoreAttention(tc, 1, AttnMaskType.causal, "self", pg_collection=pgs, sdpa_backend=kernel)
        leaves = [x.detach().to(dtype).clone().requires_grad_(True) for x in (q, k, v)]
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s,
                              max_seqlen_kv=s)
        old, sdpa_attention.MAX_DOCUMENT_CALLS = sdpa_attention.MAX_DOCUMENT_CALLS, limit
        try:
            out = attn(*leaves, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=psp)
        finally:
            sdpa_attention.MAX_DOCUMENT_CALLS = old
        assert hasattr(psp, "_ham_sdpa_mask") == (limit == 0)
        out.backward(dout.to(dtype))
        results.append([out.float(), *(x.grad.float() for x in leaves)])
    for (_, _, kernel), got in zip(runs, results):
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, results[-1]):
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < 2e-2, (kernel, name, rel)


@pytest.mark.gpu
def test_sdpa_documents_flash_equals_mask_on_gpu():
    run_world(_gpu_worker, 1)
