"""training/grad_norm.py: the foreach drop-ins compute what megatron-core's local fallbacks do
(the norm of all tensors together; dst = src * scale) and replace only those fallbacks."""
import pytest
import torch

from megatron.core import utils as mutils
from megatron.core.optimizer import clip_grads

from megatron_ham.training import grad_norm


def _grads():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g) * (i + 1) for i, s in enumerate([(7, 3), (11,), (2, 5, 4), (1,)])]


def test_l2_norm_equals_megatron_fallback():
    ts = _grads()
    flag = torch.zeros(1, dtype=torch.int)
    got, _ = grad_norm.foreach_l2_norm(2048, flag, [ts], False)
    want = torch.cat([t.reshape(-1).double() for t in ts]).norm()
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.reshape(1), rtol=1e-6, atol=0)
    mixed = [ts[0].bfloat16(), ts[1]]  # norms of several dtypes are summed in fp32
    torch.testing.assert_close(grad_norm.foreach_l2_norm(1, flag, [mixed], False)[0],
                               torch.stack([ts[0].bfloat16().float().norm(), ts[1].norm()]).norm().reshape(1))
    with pytest.raises(NotImplementedError):
        grad_norm.foreach_l2_norm(1, flag, [ts], True)


def test_scale_in_place_and_into_other_tensors():
    src = _grads()
    ref = [t * 0.25 for t in src]
    dst = [torch.zeros_like(t) for t in src]
    grad_norm.foreach_scale(1, None, [src, dst], 0.25)
    for a, b in zip(dst, ref):
        torch.testing.assert_close(a, b)
    grad_norm.foreach_scale(1, None, [src, src], 0.25)  # Megatron's clipping: in place
    for a, b in zip(src, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="3 sources for 4"):
        grad_norm.foreach_scale(1, None, [src[:3], src], 1.0)


def test_install_replaces_only_the_fallbacks(monkeypatch):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale)
    assert grad_norm.install() and grad_norm.install()  # idempotent
    assert clip_grads.l2_norm_impl is grad_norm.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is grad_norm.foreach_scale

    def apex_like(*a):  # a real multi-tensor kernel (apex / TE) stays
        return None
    monkeypatch.setattr(clip_grads, "l2_norm_impl", apex_like)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", apex_like)
    assert not grad_norm.install()
    assert clip_grads.l2_norm_impl is apex_like and clip_grads.multi_tensor_scale_impl is apex_like
