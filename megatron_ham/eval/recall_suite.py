"""Score a model on the recall tasks (recall.py): accuracy per task and length.

    rows = run_recall(model, RecallPlan(tasks, lengths, samples=16, seed=0, space=..., params=...))

Example j of (task, length) is generate(task, length, seed * 1_000_003 + j, ...): a plan and a
seed fix every example. A prediction is argmax(logits[i - 1]) for answer position i (teacher
forcing: the earlier answer tokens are given). Per (task, length):
  accuracy     correct answer tokens / answer tokens
  exact_match  examples with every answer token correct / examples
  answer_nll   mean negative log-likelihood of the answer tokens (nats; a continuous signal
               where accuracy is still 0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .recall import TextHaystack, TokenSpace, generate


@dataclass
class RecallPlan:
    tasks: Sequence[str]
    lengths: Sequence[int]
    samples: int
    seed: int
    space: TokenSpace
    params: Dict[str, dict] = field(default_factory=dict)  # task -> generate() keyword arguments
    haystack: Optional[TextHaystack] = None

    def example(self, task: str, length: int, j: int):
        return generate(task, int(length), self.seed * 1_000_003 + j, self.space,
                        haystack=self.haystack, **self.params.get(task, {}))


def score_batch(logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor):
    """(correct answer tokens [b], answer tokens [b], summed answer NLL [b]) of logits [b, s, V]
    on tokens [b, s] with answer_mask [b, s]."""
    m = answer_mask[:, 1:]  # [b, s-1]: token i+1 is an answer
    pred = logits[:, :-1].argmax(-1).cpu()  # [b, s-1]: prediction of token i+1
    right = (pred == tokens[:, 1:]) & m
    b_idx, t_idx = m.nonzero(as_tuple=True)
    lp = torch.log_softmax(logits[b_idx.to(logits.device), t_idx.to(logits.device)].double(), -1)  # [n, V]
    nll = -lp.gather(1, tokens[b_idx, t_idx + 1].to(lp.device)[:, None])[:, 0].cpu()
    per_row = torch.zeros(tokens.shape[0], dtype=torch.float64).index_add_(0, b_idx, nll)
    return right.sum(1), m.sum(1), per_row


def run_recall(model, plan: RecallPlan, *, batch_size: int, recorder=None, progress: bool = True) -> List[dict]:
    from tqdm import tqdm

    rows = []
    cells = [(t, L) for t in plan.tasks for L in plan.lengths]
    bar = tqdm(total=len(cells) * plan.samples, desc="recall", unit="ex", disable=not progress,
               dynamic_ncols=True)
    for task, length in cells:
        bar.set_postfix_str(f"{task} @ {length}")
        right = total = exact = 0
        nll = 0.0
        for start in range(0, plan.samples, batch_size):
            exs = [plan.example(task, length, j) for j in range(start, min(plan.samples, start + batch_size))]
            tokens = torch.from_numpy(np.stack([e.tokens for e in exs]))  # [b, L]
            mask = torch.from_numpy(np.stack([e.answer_mask for e in exs]))  # [b, L]
            out = model.forward(tokens)
            if recorder is not None:
                recorder.add(task, out.routing, tokens)
            r, n, lp = score_batch(out.logits, tokens, mask)
            nll += float(lp.sum())
            right += int(r.sum())
            total += int(n.sum())
            exact += int((r == n).sum())
            bar.update(len(exs))
        rows.append({"task": task, "length": int(length), "samples": plan.samples,
                     "answer_tokens": total, "accuracy": right / total if total else None,
                     "exact_match": exact / plan.samples, "answer_nll": nll / total if total else None})
    bar.close()
    return rows


__all__ = ["RecallPlan", "run_recall", "score_batch"]
