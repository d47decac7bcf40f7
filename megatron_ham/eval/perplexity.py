"""Perplexity on held-out samples, overall and by position bucket.

    perplexity(model, heldout, batch_size=4, edges=DEFAULT_EDGES) -> dict

Loss = mean next-token cross entropy over the samples' loss_mask, token-weighted over all
samples: the same number the training loop's validation reports (on the same samples), except
that the softmax covers the real vocabulary only (Megatron's vocab-padding rows, if any, are
left out so a checkpoint and its HF export agree).

By position: a token's position is its index within its document (tokens since the last
document start, a row start or the token after an EOD) when the model separates documents,
else its index in the row: the loss in bucket [a, b) is that of predictions made with a + 1 to
b tokens of context. Long-context models are judged by whether late buckets get better.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import EvalError

DEFAULT_EDGES = (0, 1024, 2048, 4096, 8192, 16384)


def check_edges(edges: Sequence[int]) -> List[int]:
    e = [int(x) for x in edges]
    if not e or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"--buckets must start at 0 and increase strictly, got {list(edges)}")
    return e


def document_positions(tokens: torch.Tensor, eod_id: Optional[int]) -> torch.Tensor:
    """int64 [b, s]: index of each token within its document (a new document starts at each row
    start and after each EOD); eod_id None = the row index."""
    b, s = tokens.shape
    idx = torch.arange(s, device=tokens.device).expand(b, s)
    if eod_id is None:
        return idx.clone()
    start = torch.zeros_like(tokens, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = tokens[:, :-1] == eod_id
    last_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def _label(a: int, b: Optional[int]) -> str:
    def k(x):
        return f"{x // 1024}k" if x and x % 1024 == 0 else str(x)

    return f"{k(a)}-{k(b)}" if b is not None else f"{k(a)}+"


def perplexity(model, heldout, *, batch_size: int, edges: Sequence[int] = DEFAULT_EDGES,
               recorder=None, progress: bool = True) -> dict:
    """Evaluate `model` (model_io.EvalModel) on `heldout` (heldout.HeldOut). Returns
    {"loss", "ppl", "tokens", "samples", "seq_length", "position_basis", "by_position": [
    {"start", "end" (None = open), "label", "tokens", "loss", "ppl"}]} (empty buckets left out)."""
    from tqdm import tqdm

    e = check_edges(edges)
    s = heldout.seq_length
    edge_t = torch.tensor(e, dtype=torch.long)
    loss_sum = torch.zeros(len(e), dtype=torch.float64)
    count = torch.zeros(len(e), dtype=torch.float64)
    V = model.info.vocab_size
    eod = model.info.eod_id if model.info.documents else None
    n = heldout.num_samples
    bar = tqdm(total=n, desc="perplexity", unit="seq", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        items = [heldout.dataset[i] for i in range(start, min(n, start + batch_size))]
        tokens = torch.stack([torch.as_tensor(x["tokens"]) for x in items]).long()  # [b, s]
        labels = torch.stack([torch.as_tensor(x["labels"]) for x in items]).long()  # [b, s]
        mask = torch.stack([torch.as_tensor(x["loss_mask"]) for x in items]).double()  # [b, s]
        top = int(max(tokens.max(), labels.max()))
        if top >= V or int(min(tokens.min(), labels.min())) < 0:
            raise EvalError(f"--data {heldout.info['data']}: token id {top} is outside the model's "
                            f"vocabulary [0, {V}): the data was tokenized for another model")
        out = model.forward(tokens)
        if recorder is not None:
            recorder.add("ppl", out.routing, tokens)
        nll = F.cross_entropy(out.logits.reshape(-1, V), labels.to(out.logits.device).reshape(-1),
                              reduction="none").reshape(labels.shape).double().cpu()  # [b, s]
        pos = document_positions(tokens, eod)  # [b, s]
        bucket = torch.bucketize(pos, edge_t, right=True) - 1  # [b, s] in [0, len(e))
        loss_sum.index_add_(0, bucket.reshape(-1), (nll * mask).reshape(-1))
        count.index_add_(0, bucket.reshape(-1), mask.reshape(-1))
        bar.update(len(items))
    bar.close()
    total, toks = float(loss_sum.sum()), float(count.sum())
    loss = total / max(toks, 1.0)
    rows = []
    for i, a in enumerate(e):
        b = e[i + 1] if i + 1 < len(e) else None
        if count[i] == 0:
            continue
        li = float(loss_sum[i] / count[i])
        rows.append({"start": a, "end": b, "label": _label(a, b), "tokens": int(count[i]),
                     "loss": li, "ppl": _exp(li)})
    return {"loss": loss, "ppl": _exp(loss), "tokens": int(toks), "samples": n, "seq_length": s,
            "position_basis": "document" if eod is not None else "row", "by_position": rows}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


__all__ = ["perplexity", "document_positions", "check_edges", "DEFAULT_EDGES"]
