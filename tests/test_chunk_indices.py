"""kernels.chunk_indices: fla's chunk indices of packed documents, built on the host from the
boundaries' host copy, equal fla's own (computed from the boundaries alone)."""
import pytest
import torch

pytest.importorskip("fla")


@pytest.mark.parametrize("lens", [
    [16384],                      # one document, a multiple of the chunk
    [5, 1, 70, 0, 3],             # a 1-token and an empty document
    [64, 65, 63, 128, 1, 1, 200],
    [1] * 40,                     # many one-token documents
])
@pytest.mark.parametrize("chunk", [16, 64])
def test_host_chunk_indices_equal_fla(lens, chunk):
    from fla.ops.utils.index import prepare_chunk_indices

    from megatron_ham.kernels.chunk_indices import chunk_indices

    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    want = prepare_chunk_indices(cu.clone(), chunk)
    got = chunk_indices(cu, chunk, cu.clone())
    assert got.dtype == cu.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    # cached by identity: the same pair of tensors gives the same tensor object (built once per forward)
    host = cu.clone()
    assert chunk_indices(cu, chunk, host) is chunk_indices(cu, chunk, host)
