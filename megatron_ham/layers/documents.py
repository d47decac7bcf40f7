"""Documents of a packed batch: where they start, as Megatron's PackedSeqParams and as ids.

Training packs several documents into each row; nothing may leak across a document boundary.
`document_forward_kwargs(tokens, eod_id)` (used by the training loop, the exporter's verify and
the tests) turns the EOD tokens of a batch into PackedSeqParams(qkv_format="sbhd") with
cu_seqlens over the flattened batch (index = row * s + position); the layers read them back:
SDPACoreAttention as one causal call per row or per document (a block-diagonal mask
above MAX_DOCUMENT_CALLS documents), the GDN / HAM mixers as cu_seqlens for their ops
(`document_cu_seqlens`) and document ids for the conv (`cached_document_ids`, computed once per
forward and shared by all layers).
"""
from __future__ import annotations

from typing import Optional

import torch


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """int64 [b, s] document index of every token; cu_seqlens int [N+1] over the flattened b*s
    tokens (batch-major). Raises ValueError when cu_seqlens does not end at b*s."""
    cu = cu_seqlens.to(torch.int64).reshape(-1)
    if cu.numel() < 2:
        raise ValueError(f"packed_seq_params.cu_seqlens must have >= 2 entries, got {cu.numel()}")
    # value checks need the host: only on CPU tensors (no device sync per layer on GPU;
    # document_forward_kwargs builds valid boundaries)
    if not cu.is_cuda and (int(cu[0]) != 0 or int(cu[-1]) != b * s):
        raise ValueError(
            f"packed_seq_params.cu_seqlens must start at 0 and end at b*s = {b * s} "
            f"(boundaries over the flattened batch), got {cu.tolist()[:8]}..."
        )
    pos = torch.arange(b * s, device=cu.device)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    return doc.reshape(b, s)


def cached_document_ids(packed_seq_params, b: int, s: int, device) -> torch.Tensor:
    """document_ids_from_cu_seqlens, computed once per PackedSeqParams object (one forward)
    and shared by all layers."""
    key = (b, s, str(device))
    cache = getattr(packed_seq_params, "_ham_doc_ids", None)
    if cache is None or cache[0] != key:
        doc = document_ids_from_cu_seqlens(packed_seq_params.cu_seqlens_q, b, s).to(device)
        cache = (key, doc)
        setattr(packed_seq_params, "_ham_doc_ids", cache)
    return cache[1]


def document_cu_seqlens(packed_seq_params, b: int, s: int) -> Optional[torch.Tensor]:
    """cu_seqlens over the flattened batch from packed_seq_params (or None)."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", None)
    if fmt not in (None, "sbhd"):
        raise ValueError(
            "HAM/GDN mixers: packed_seq_params.qkv_format must be 'sbhd' (document boundaries "
            f"over the flattened batch, see document_forward_kwargs), got {fmt!r}"
        )
    cu = packed_seq_params.cu_seqlens_q
    cache = getattr(packed_seq_params, "_ham_cu64", None)
    if cache is None or cache[0] is not cu:
        cached_document_ids(packed_seq_params, b, s, cu.device)  # validates (once per forward)
        # one int64 tensor object for every layer of the forward: the GDN kernels' chunk
        # indices (fla's identity-keyed cache) are then computed once, not once per layer
        cache = (cu, cu.to(torch.int64))
        setattr(packed_seq_params, "_ham_cu64", cache)
    return cache[1]


def host_cu_seqlens(packed_seq_params) -> Optional[torch.Tensor]:
    """The boundaries as an int64 CPU tensor when document_forward_kwargs kept them (no device
    sync: SDPACoreAttention's spans, and the GPU kernels' chunk indices as ``cu_seqlens_cpu``)."""
    return getattr(packed_seq_params, "_ham_cu_host", None)


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: through pinned memory and a
    non-blocking copy on CUDA (a pageable copy waits for the stream), a plain copy elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def document_forward_kwargs(tokens: torch.Tensor, eod_id: int, device=None) -> dict:
    """Extra kwargs for the model forward so nothing leaks across documents of a packed batch.

    tokens: int [b, s]; a document ends WITH its EOD token (the token after an EOD starts a new
    document), and every batch row starts a new document. device: where the model runs (default
    tokens' device). Give the tokens as the data loader made them, on the host: the boundaries
    are computed there, and the device gets them without the host waiting for the GPU (tokens
    already on a GPU cost one copy back, i.e. one sync).
    Returns {"packed_seq_params": PackedSeqParams(qkv_format="sbhd", cu_seqlens_q = cu_seqlens_kv
    = int32 boundaries over the flattened batch (index = row * s + position) on `device`,
    max_seqlen_q = max_seqlen_kv = s)}; the host copy stays with it (host_cu_seqlens). The HAM /
    GDN mixers restart their state, conv and scratchpad at each boundary; SDPACoreAttention masks
    attention to the same document. RoPE positions stay the row positions (relative, so
    unaffected). Pass the same dict to every pipeline stage.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be an int tensor [b, s], got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    b, s = tokens.shape
    device = tokens.device if device is None else torch.device(device)
    # on the host: no data-dependent op on the device (nonzero / unique there would each wait)
    host = tokens.detach().to("cpu")
    ends = host[:, :-1] == eod_id  # boundary after position i (i < s-1)
    # positions in flattened coordinates
    if s > 1:
        r, c = torch.nonzero(ends, as_tuple=True)
        inner = r * s + c + 1
    else:
        inner = torch.zeros(0, dtype=torch.long)
    cu = torch.unique(torch.cat([torch.arange(b) * s, inner, torch.tensor([b * s])]))  # int64
    dev = to_device_async(cu.to(torch.int32), device)
    params = PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=dev, cu_seqlens_kv=dev, max_seqlen_q=s, max_seqlen_kv=s
    )
    setattr(params, "_ham_cu_host", cu)  # read by host_cu_seqlens
    return {"packed_seq_params": params}
