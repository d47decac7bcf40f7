"""causal_conv_silu: Conv1d equivalence, document restarts, bad input."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ham.ops import causal_conv_silu


def _conv1d(x, w):
    """torch's depthwise Conv1d with W-1 zeros of left padding, then SiLU; x [B,T,C], w [C,W]."""
    W = w.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w[:, None, :], groups=x.shape[-1])
    return F.silu(y).transpose(1, 2)


def test_documents_restart_the_taps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(causal_conv_silu(x, w), _conv1d(x, w))
    cuts = [0, 5, 6, 13]  # documents of 5, 1 and 7 tokens in each row
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 7]))[None].expand(2, 13)
    got = causal_conv_silu(x, w, doc)
    for a, b in zip(cuts[:-1], cuts[1:]):
        torch.testing.assert_close(got[:, a:b], _conv1d(x[:, a:b], w))
    assert not torch.allclose(got, causal_conv_silu(x, w))  # the boundaries matter


def test_pre_activation_then_silu_in_the_activations_is_the_same():
    """The mixers' split: causal_conv_silu(silu=False) is the conv alone, and gdn_activations(
    silu=True) applies the SiLU: together the same q, k, v, g, beta as the conv with its SiLU
    followed by the plain activations (with documents and padding too)."""
    from megatron_ham.ops import gdn_activations

    g = torch.Generator().manual_seed(3)
    H, K, V, T = 2, 4, 3, 11
    x = torch.randn(2, T, H * (2 * K + V), generator=g, dtype=torch.float64)
    w = torch.randn(x.shape[-1], 4, generator=g, dtype=torch.float64)
    doc = torch.repeat_interleave(torch.arange(2), torch.tensor([4, 7]))[None].expand(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :3] = False
    pre = causal_conv_silu(x, w, doc, mask=mask, silu=False)
    torch.testing.assert_close(F.silu(pre) * mask[..., None], causal_conv_silu(x, w, doc, mask=mask))
    torch.testing.assert_close(causal_conv_silu(x, w, silu=False).narrow(1, 3, 1),
                               (x[:, :4].flip(1) * w.T.flip(0)).sum(1, keepdim=True))
    a, b = torch.randn(2, T, H, generator=g), torch.randn(2, T, H, generator=g)
    A_log, dt = torch.randn(H, generator=g), torch.randn(H, generator=g)
    split = gdn_activations(pre, a, b, A_log, dt, H, K, V, silu=True)
    fused = gdn_activations(F.silu(pre), a, b, A_log, dt, H, K, V)
    for s_, f_ in zip(split, fused):
        torch.testing.assert_close(s_, f_)


def test_padding_is_no_tap():
    """mask False = no token: each real token's taps are the real tokens before it (across the
    padding), as if the padding were not there; padding outputs 0; documents still restart."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = False   # left padding
    mask[1, 5:7] = False  # a gap
    doc = torch.zeros(2, 12, dtype=torch.long)
    doc[1, 9:] = 1        # a document starts after the gap
    got = causal_conv_silu(x, w, doc, mask=mask)
    for b in range(2):
        torch.testing.assert_close(got[b, mask[b]],
                                   causal_conv_silu(x[b:b + 1, mask[b]], w, doc[b:b + 1, mask[b]])[0])
        assert not got[b, ~mask[b]].any()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        causal_conv_silu(x, w, mask=mask.long())


def test_short_sequences_and_bad_input():
    x = torch.randn(1, 2, 3)
    w = torch.randn(3, 4)
    torch.testing.assert_close(causal_conv_silu(x, w), _conv1d(x, w))  # T < W
    with pytest.raises(ValueError, match="weight"):
        causal_conv_silu(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="doc"):
        causal_conv_silu(x, w, torch.zeros(1, 3, dtype=torch.long))


def test_mixer_reads_qkv_as_one_view_of_the_projection():
    """The mixers split the fused projection once, q, k, v as one view (no concatenation)."""
    from megatron_ham.layers.gdn_mixer import GDNMixer

    class Fake:  # just what _split_sections reads
        section_names = lambda self, p: ["q", "k", "v", "z", "beta", "a"]  # noqa: E731
        local_widths = lambda self, p: [4, 4, 6, 6, 2, 2]  # noqa: E731
    proj = torch.randn(2, 5, 24)
    parts = GDNMixer._split_sections(Fake(), proj)
    assert list(parts) == ["qkv", "z", "beta", "a"]
    assert parts["qkv"].data_ptr() == proj.data_ptr() and parts["qkv"].shape[-1] == 14
    torch.testing.assert_close(parts["a"], proj[..., 22:])


def test_boundaries_equal_document_ids_and_bad_documents():
    """cu_seqlens (the form fla's kernel takes) give the same conv as the document ids; both at
    once, or a kernel that cannot run here, are refused with the reason."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 13, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 7]))[None]
    cu = torch.tensor([0, 5, 6, 13])
    torch.testing.assert_close(causal_conv_silu(x, w, cu_seqlens=cu), causal_conv_silu(x, w, doc))
    with pytest.raises(ValueError, match="not both"):
        causal_conv_silu(x, w, doc, cu_seqlens=cu)
    with pytest.raises(ValueError, match="must end at T = 13"):
        causal_conv_silu(x, w, cu_seqlens=torch.tensor([0, 5, 12]))
    # the host copy (cu_seqlens_cpu): the value checks read it; it must match in size and be on the host
    torch.testing.assert_close(causal_conv_silu(x, w, cu_seqlens=cu, cu_seqlens_cpu=cu.clone()),
                               causal_conv_silu(x, w, doc))
    with pytest.raises(ValueError, match="must end at T = 13"):
        causal_conv_silu(x, w, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 5, 12, 12]))
    with pytest.raises(ValueError, match="cu_seqlens_cpu has 3 entries, cu_seqlens 4"):
        causal_conv_silu(x, w, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 6, 13]))
    with pytest.raises(ValueError, match="cu_seqlens_cpu must have an integer dtype"):
        causal_conv_silu(x, w, cu_seqlens=cu, cu_seqlens_cpu=cu.double())
    with pytest.raises(ValueError, match="batch size B = 1"):
        causal_conv_silu(x.expand(2, 13, 6), w, cu_seqlens=cu)
    with pytest.raises(ValueError, match="impl='fla' needs CUDA"):
        causal_conv_silu(x, w, impl="fla")
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_conv_silu(x, w, impl="triton")


def test_conv_impl_dispatch():
    """auto runs the reference off CUDA; fla's kernel asked for on CPU tensors, or an unknown
    impl, is a clear error naming the op."""
    from megatron_ham.ops.short_conv import conv_impl

    x = torch.randn(1, 8, 4)
    assert conv_impl(x) == "reference" and conv_impl(x, "reference") == "reference"
    with pytest.raises(ValueError, match="causal_conv_silu: impl='fla' needs CUDA bf16/fp16"):
        conv_impl(x, "fla")
    with pytest.raises(ValueError, match="impl must be one of"):
        conv_impl(x, "cuda")
