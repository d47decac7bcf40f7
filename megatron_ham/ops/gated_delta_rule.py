"""Gated delta rule (Gated DeltaNet recurrence) with per-token prediction error, in plain PyTorch.

This is the recurrent path of the HAM layer. Two implementations of the same math:

* ``impl="naive"``: the sequential per-token recurrence. It is the definition.
* ``impl="chunk"``: a chunked (WY / triangular-solve) form over chunks of ``CHUNK_SIZE`` tokens.
  Inside a chunk everything is matrix products plus one unit-lower-triangular solve; only the
  chunk-start states are carried sequentially (one ``[K,K] @ [K,V]`` product per chunk). The
  prediction error is solved for directly, never recovered by dividing by ``beta``.

Both are ordinary autograd graphs, so gradients (w.r.t. q, k, v, g, beta, initial_state) come
from autograd and agree between the implementations.

Layout is fla's: ``[B, T, H, D]`` (batch, time, heads, head dim). The op is head-local, so under
tensor parallelism the ``H`` dimension may be split over ranks without any communication.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from ._checks import check_cu_seqlens, check_tensor
from ._kernels import kernel_import_error, load_kernels

__all__ = ["gated_delta_rule", "CHUNK_SIZE", "IMPLS", "ERROR_METRICS"]

#: Tokens per chunk of ``impl="chunk"`` (read at call time, so tests may change it).
CHUNK_SIZE = 64
#: Accepted values of ``impl``.
IMPLS = ("auto", "naive", "chunk", "fla")
#: Accepted values of ``error_metric``.
ERROR_METRICS = ("l2", "cosine")


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    return_error: bool = False,
    error_metric: str = "l2",
    cu_seqlens: Optional[torch.Tensor] = None,
    cu_seqlens_cpu: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    r"""Gated delta rule over a sequence, optionally returning each token's prediction error.

    Shapes (fla layout, heads never mixed, so H may be split over tensor-parallel ranks):
        q, k:          ``[B, T, H, K]``  (NOT normalised here: the caller L2-normalises q, k)
        v:             ``[B, T, H, V]``
        g:             ``[B, T, H]``  log decay, must be ``<= 0`` (alpha_t = exp(g_t) in (0, 1])
        beta:          ``[B, T, H]``  write strength (usually sigmoid(.) in (0, 1))
        initial_state: ``[B, H, K, V]``, or ``[N, H, K, V]`` with ``cu_seqlens`` (one per document)
        cu_seqlens:    integer ``[N+1]``, ``0 = c_0 <= c_1 <= ... <= c_N = T``; only with ``B == 1``.
                       Document n is tokens ``c_n .. c_{n+1}-1``; the state restarts at each
                       document (from zero or from ``initial_state[n]``).
        cu_seqlens_cpu: the same boundaries on the host, optional (fla's convention): with it
                       their value checks run and nothing here waits for the GPU (the GPU
                       kernels derive their chunk indices on the host, the reference its
                       packing); without it a CUDA ``cu_seqlens`` costs one sync per new tensor.
        mask:          bool ``[B, T]`` or None; False marks a token that is not there (padding):
                       its k, g and beta are taken as 0, so the state passes it unchanged (the
                       rule the op uses for its own padding), its o is the state's readout and
                       its err is 0.

    Returns ``(o, final_state, err)``:
        o:           ``[B, T, H, V]`` in ``v.dtype``
        final_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with cu_seqlens), or None unless
                     ``output_final_state``
        err:         ``[B, T, H]``, or None unless ``return_error``

    Equations (state ``S`` is ``[K, V]`` as in fla, i.e. a sum of outer products ``k v^T``)::

        alpha_t = exp(g_t)
        e_t     = v_t - alpha_t S_{t-1}^T k_t                        (prediction error, [V])
        S_t     = alpha_t S_{t-1} + beta_t k_t e_t^T
        o_t     = scale * S_t^T q_t          (scale defaults to K ** -0.5)

    ``error_metric``:
        ``"l2"``:     err_t = ||e_t||_2 (its gradient is taken as 0 where e_t == 0)
        ``"cosine"``: err_t = 1 - cos(p_t, v_t) with p_t = alpha_t S_{t-1}^T k_t = v_t - e_t;
                      cos is defined as 0 when p_t or v_t is the zero vector (e.g. at the first
                      token of a sequence without initial state), so err_t = 1 there.

    Dtypes: every input is cast to float32 internally (float64 if any input is float64, which is
    what ``torch.autograd.gradcheck`` needs); ``o`` is cast back to ``v.dtype``; ``final_state``
    and ``err`` stay in the internal dtype (float32 for fp32/bf16/fp16 inputs).

    ``impl``: ``"naive"`` (sequential recurrence), ``"chunk"`` (chunked form), ``"fla"`` (GPU
    kernels, err detached), or ``"auto"`` (see :func:`_resolve_impl`: ``"fla"`` for CUDA
    bf16/fp16 inputs, else ``"chunk"``).

    Raises ValueError naming the argument for wrong ranks/shapes, non-floating dtypes,
    mismatched B/T/H/K/V, ``g > 0``, bad ``cu_seqlens``, unknown ``impl`` or ``error_metric``;
    the value checks (``g > 0``, cu_seqlens' values) run on CPU tensors only: on CUDA they would
    wait for the GPU at every call.
    """
    B, T, H, K, V, N = _validate(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, impl, error_metric, mask, cu_seqlens_cpu
    )
    if mask is not None:
        k, g, beta = _no_token(mask, k, g, beta)
    resolved = _resolve_impl(impl, q)
    if resolved == "fla":  # GPU path (megatron_ham.kernels.gdn); err is returned detached
        fla = load_kernels("gdn").gdn_with_error
        o, final_state, err = fla(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, return_error=return_error,
                                  error_metric=error_metric, cu_seqlens=cu_seqlens,
                                  cu_seqlens_cpu=cu_seqlens_cpu)
        return o, final_state, _zero_at(err, mask)
    if scale is None:
        scale = K ** -0.5
    scale = float(scale)

    ct = _compute_dtype(q, k, v, g, beta, initial_state)
    qf, kf, vf, gf, bf = (x.to(ct) for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.to(ct)

    if cu_seqlens is not None:
        # Packed documents -> a padded batch [N, Lmax, ...]; padding tokens have g = 0 (no decay),
        # beta = 0 and k = 0 (no write), so they leave each document's final state untouched.
        src, valid = _packing_index(cu_seqlens, T, cu_seqlens_cpu)
        qf, kf, vf, gf, bf = (_pack(x, src) for x in (qf, kf, vf, gf, bf))

    core = _chunk_core if resolved == "chunk" else _naive_core
    o, final_state, e = core(qf, kf, vf, gf, bf, scale, h0)

    if cu_seqlens is not None:
        o = o[valid].unsqueeze(0)
        e = e[valid].unsqueeze(0)
        vf = vf[valid].unsqueeze(0)

    err = _error(e, vf, error_metric) if return_error else None
    return o.to(v.dtype), (final_state if output_final_state else None), _zero_at(err, mask)


def _no_token(mask: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """k, g, beta with 0 where mask [B,T] is False: no decay and no write, the token is skipped."""
    off = ~mask.to(device=k.device)
    return (k.masked_fill(off[..., None, None], 0.0), g.masked_fill(off[..., None], 0.0),
            beta.masked_fill(off[..., None], 0.0))


def _zero_at(err: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """err [B,T,H] with 0 where mask [B,T] is False (no token, no prediction error)."""
    if err is None or mask is None:
        return err
    return err.masked_fill(~mask.to(device=err.device)[..., None], 0.0)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def _resolve_impl(impl: str, q: torch.Tensor) -> str:
    """Map ``impl`` to the implementation that runs. THE single dispatch point.

    ``"auto"``: ``"fla"`` (megatron_ham.kernels.gdn: fla 0.6.0 chunked kernels + our Triton
    routing-error kernel) for CUDA bf16/fp16 tensors with head dims <= 256 when it imports;
    otherwise ``"chunk"`` (the CPU path, unchanged). On the ``"fla"`` path ``err`` is returned
    DETACHED (no gradient; the HAM mixer uses it only for a hard routing decision) and
    ``o`` keeps ``v``'s dtype. ``"fla"`` asked for explicitly raises ValueError when it cannot run.
    """
    if impl == "auto":
        if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256):
            kernels = load_kernels()
            if kernels is not None and kernels.gdn_available():
                return "fla"
        return "chunk"
    if impl == "fla":
        kernels = load_kernels()
        if not q.is_cuda or kernels is None or not kernels.gdn_available():
            raise ValueError(f"impl='fla' needs CUDA tensors and fla 0.6.0 (q on {q.device}; "
                             f"import: {kernel_import_error('gdn')})")
    return impl


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _validate(q, k, v, g, beta, scale, initial_state, cu_seqlens, impl, error_metric, mask=None,
              cu_seqlens_cpu=None):
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if not isinstance(error_metric, str) or error_metric not in ERROR_METRICS:
        raise ValueError(f"error_metric must be one of {list(ERROR_METRICS)}, got {error_metric!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise ValueError(f"scale must be a real number or None, got {scale!r}")

    check_tensor("q", q, [None, None, None, None], "[B,T,H,K]")
    B, T, H, K = q.shape
    check_tensor("k", k, [B, T, H, K], "[B,T,H,K]")
    check_tensor("v", v, [B, T, H, None], "[B,T,H,V]")
    V = v.shape[-1]
    check_tensor("g", g, [B, T, H], "[B,T,H]")
    check_tensor("beta", beta, [B, T, H], "[B,T,H]")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    # value checks need the host: CPU tensors only (on CUDA they would stop the host once per
    # layer and call; the layers build g <= 0 and cu_seqlens by construction)
    if not g.is_cuda and g.numel() and bool((g > 0).any()):
        raise ValueError(
            f"g must be a log decay <= 0 everywhere (shape [B,T,H]), got max {g.max().item():.4g}"
        )

    N = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T, cu_seqlens_cpu)
        N = cu_seqlens.numel() - 1

    if initial_state is not None:
        lead = "N" if cu_seqlens is not None else "B"
        check_tensor("initial_state", initial_state, [N, H, K, V], f"[{lead},H,K,V]")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device {q.device}, got {initial_state.device}")
    if mask is not None:
        check_tensor("mask", mask, [B, T], "[B,T]", floating=False)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape [B,T], got dtype {mask.dtype}")
    return B, T, H, K, V, N


def _compute_dtype(*xs) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


# --------------------------------------------------------------------------------------------
# Packing of cu_seqlens documents into a padded batch
# --------------------------------------------------------------------------------------------
def _packing_index(cu_seqlens: torch.Tensor, T: int, cu_seqlens_cpu: Optional[torch.Tensor] = None):
    """Return (src [N, Lmax] long, valid [N, Lmax] bool) on cu_seqlens' device; src == T marks a
    padding slot. Computed on the host (from cu_seqlens_cpu when given: no copy back)."""
    cs = (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).to(device="cpu", dtype=torch.long)
    starts, lens = cs[:-1], cs[1:] - cs[:-1]
    lmax = int(lens.max().item()) if lens.numel() else 0
    pos = torch.arange(lmax)
    valid = pos[None, :] < lens[:, None]
    src = torch.where(valid, starts[:, None] + pos[None, :], torch.full_like(valid, T, dtype=torch.long))
    return src.to(cu_seqlens.device), valid.to(cu_seqlens.device)


def _pack(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] -> [N, Lmax, ...], zeros in padding slots (differentiable gather)."""
    x0 = x[0]
    padded = torch.cat([x0, x0.new_zeros((1,) + tuple(x0.shape[1:]))], dim=0)
    return padded[src]


# --------------------------------------------------------------------------------------------
# Error metric
# --------------------------------------------------------------------------------------------
def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 with gradient 0 (not inf/nan) at x == 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _error(e: torch.Tensor, v: torch.Tensor, metric: str) -> torch.Tensor:
    """e, v: [B, T, H, V] (internal dtype) -> err [B, T, H]."""
    if metric == "l2":
        return _safe_sqrt((e * e).sum(-1))
    pred = v - e
    dot = (pred * v).sum(-1)
    denom2 = (pred * pred).sum(-1) * (v * v).sum(-1)
    ok = denom2 > 0
    cos = torch.where(ok, dot * torch.rsqrt(torch.where(ok, denom2, torch.ones_like(denom2))),
                      torch.zeros_like(dot))
    return 1.0 - cos


# --------------------------------------------------------------------------------------------
# Implementations. Inputs in the internal dtype, layout [B, T, H, *]; h0 [B, H, K, V] or None.
# Each returns (o [B,T,H,V], final_state [B,H,K,V], e [B,T,H,V]) in the internal dtype.
# --------------------------------------------------------------------------------------------
def _naive_core(q, k, v, g, beta, scale, h0):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    alpha = g.exp()
    os, es = [], []
    for t in range(T):
        S = S * alpha[:, t, :, None, None]                       # decay
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)         # alpha_t S_{t-1}^T k_t
        e = v[:, t] - pred
        S = S + (beta[:, t, :, None] * k[:, t])[..., None] * e[..., None, :]
        os.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        es.append(e)
    if T == 0:
        empty = v.new_zeros(B, 0, H, V)
        return empty, S, empty
    return torch.stack(os, dim=1), S, torch.stack(es, dim=1)


def _chunk_core(q, k, v, g, beta, scale, h0):
    r"""Chunked form. Within a chunk of C tokens (local index t = 1..C), with G_t = sum_{i<=t} g_i
    and S_0 the state at the chunk start:

        alpha_t S_{t-1} = exp(G_t) S_0 + sum_{j<t} exp(G_t - G_j) beta_j k_j e_j^T
        => (I + A) E = Vc - diag(exp(G)) Kc S_0,  A_tj = [j<t] exp(G_t - G_j) (k_t . k_j) beta_j

    (I + A) is unit lower triangular and independent of S_0, so one batched triangular solve
    with right-hand side [Vc | diag(exp G) Kc] gives U, W with E = U - W S_0 (all chunks at once).
    Then, per chunk,
        S_C = exp(G_C) S_0 + Kd^T E,   Kd_j = exp(G_C - G_j) beta_j k_j
            = (exp(G_C) I - Kd^T W) S_0 + Kd^T U          (the only sequential step)
        O   = scale * (diag(exp G) Qc S_0 + (Qc Kc^T * Dm) diag(beta) E),  Dm_tj = [j<=t] exp(G_t-G_j)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(CHUNK_SIZE)
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    if T == 0:
        empty = v.new_zeros(B, 0, H, V)
        return empty, S, empty
    nc = -(-T // C)
    pad = nc * C - T

    def prep(x):  # [B, T, H, *] -> [B, H, nc, C, *], zero padded at the end
        x = x.transpose(1, 2)
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[:2] + (pad,) + x.shape[3:])], dim=2)
        return x.reshape(x.shape[:2] + (nc, C) + x.shape[3:])

    qc, kc, vc, gc, bc = prep(q), prep(k), prep(v), prep(g), prep(beta)   # padding: g=0, beta=0

    G = gc.cumsum(-1)                                           # [B,H,nc,C]
    idx = torch.arange(C, device=q.device)
    incl = idx[:, None] >= idx[None, :]                         # j <= t
    strict = idx[:, None] > idx[None, :]                        # j <  t
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~incl, float("-inf"))
    Dm = diff.exp()                                             # [B,H,nc,C,C], 0 above diagonal
    eG = G.exp()
    GC = G[..., -1:]                                            # [B,H,nc,1]

    A = (kc @ kc.transpose(-1, -2)) * Dm * bc[..., None, :]
    A = A.masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([vc, eG[..., None] * kc], dim=-1)          # [.., C, V+K]
    X = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U, W = X[..., :V], X[..., V:]                               # E = U - W S_0

    Kd = kc * ((GC - G).exp() * bc)[..., None]                  # [.., C, K]
    KdT = Kd.transpose(-1, -2)
    M = KdT @ W                                                 # [B,H,nc,K,K]
    R = KdT @ U                                                 # [B,H,nc,K,V]
    eGC = GC.exp()[..., None]                                   # [B,H,nc,1,1]

    starts = []
    for n in range(nc):
        starts.append(S)
        S = eGC[:, :, n] * S - M[:, :, n] @ S + R[:, :, n]
    S0 = torch.stack(starts, dim=2)                             # [B,H,nc,K,V]

    E = U - W @ S0                                              # [.., C, V]
    P = (qc @ kc.transpose(-1, -2)) * Dm
    O = scale * ((eG[..., None] * qc) @ S0 + P @ (bc[..., None] * E))

    def unprep(x):  # [B, H, nc, C, V] -> [B, T, H, V]
        x = x.reshape(B, H, nc * C, x.shape[-1])[:, :, :T]
        return x.transpose(1, 2)

    return unprep(O), S, unprep(E)
