"""Padded batches in the Hugging Face model: every row of a padded batch (left or right padding,
with attention_mask) gives the logits and the greedy / beam generations it gives alone.

Tiny randomly initialised HAMForCausalLM models of each layer kind (HAM with every router, GDN,
attention, a hybrid), documents on and off (rows hold an EOD), taus placed halfway between two
of the rows' own scores so that about half of the tokens are routed and no score sits near tau.
The pipeline test runs transformers' text-generation pipeline with batch_size=4 on a model saved
with the sample tokenizer (pad id 1, EOD 0).
"""
from __future__ import annotations

import os

import pytest
import torch

import megatron_ham.hf  # noqa: F401  (registers model_type megatron_ham)
from megatron_ham.hf import HAMConfig, HAMForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data_prep", "sample", "tokenizer")
EOD, PAD, VOCAB = 0, 1, 64
LENGTHS = (7, 13, 3, 10)
ATOL = 2e-5
MODELS = {  # name: (pattern, router)
    "ham_l2": ("HH", "error_l2"),
    "ham_cosine": ("HH", "error_cosine"),
    "ham_learned": ("HH", "learned"),
    "gdn": ("GG", "error_l2"),
    "attention": ("**", "error_l2"),
    "hybrid": ("H*G", "error_l2"),
}


def tiny_model(pattern: str, router: str, documents: bool = True, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    cfg = HAMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=len(pattern),
                    layer_pattern=pattern, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    mixer_num_heads=2, mixer_key_head_dim=8, mixer_value_head_dim=8, router=router,
                    router_hidden_size=8, scratchpad_scale=8 ** 0.5, eod_token_id=EOD,
                    reset_at_eod=documents, eos_token_id=EOD, pad_token_id=PAD, bos_token_id=EOD,
                    ops_impl="chunk")
    return HAMForCausalLM(cfg).eval()


def sample_rows():
    """Rows of different lengths, ids >= 2 (no pad, no EOD) but an EOD inside rows 1 and 3."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, VOCAB, (n,), generator=g) for n in LENGTHS]
    rows[1][4] = EOD
    rows[3][6] = EOD
    return rows


@torch.no_grad()
def place_taus(model, rows):
    """Each HAM layer (in order) routes 35-65 % of the rows' tokens, run alone: tau in the
    widest gap between two neighbouring scores there (far from every score compared to float
    rounding)."""
    for _, m in model.ham_mixers():
        m.tau = float("-inf")
        scores = []
        for r in rows:
            model(r[None], use_cache=False)
            scores.append(m.last_scores.reshape(-1))
        s = torch.cat(scores).double().sort(descending=True).values
        lo, hi = int(len(s) * 0.35), int(len(s) * 0.65)
        n = lo + int((s[lo - 1:hi - 1] - s[lo:hi]).argmax())
        assert s[n - 1] - s[n] > 1e-6, "two scores too close to place tau between them"
        m.tau = float((s[n - 1] + s[n]) / 2)


def pad(rows, side: str, value: int = PAD):
    """(ids [B, T], attention_mask [B, T]) of the rows padded on `side` to the longest."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], am[b, sl] = r, 1
    return ids, am


@torch.no_grad()
def _alone(model, rows):
    """Per row alone: logits [n, V] and each HAM layer's routing decisions [n]."""
    out = []
    for r in rows:
        logits = model(r[None], use_cache=False).logits[0]
        out.append((logits, [m.last_routed[0].clone() for _, m in model.ham_mixers()]))
    return out


@pytest.mark.parametrize("documents", [True, False], ids=["documents", "no_documents"])
@pytest.mark.parametrize("name", list(MODELS))
def test_padded_rows_give_the_logits_of_rows_alone(name, documents):
    pattern, router = MODELS[name]
    model = tiny_model(pattern, router, documents)
    rows = sample_rows()
    place_taus(model, rows)
    alone = _alone(model, rows)
    if "H" in pattern:  # routing is partial: the padding test sees real routing decisions
        routed = torch.cat([a[1][0] for a in alone]).float().mean().item()
        assert 0.3 <= routed <= 0.7, routed
    for side in ("left", "right"):
        ids, am = pad(rows, side)
        with torch.no_grad():
            full = model(ids, attention_mask=am, use_cache=False).logits
            routed = [m.last_routed.clone() for _, m in model.ham_mixers()]
            # the same batch prefilled through the cache in two chunks (mask [B, past + T])
            c = model(ids[:, :5], attention_mask=am[:, :5], use_cache=True)
            rest = model(ids[:, 5:], attention_mask=am, past_key_values=c.past_key_values, use_cache=True)
            chunked = torch.cat([c.logits, rest.logits], 1)
        for b, (logits, routed_alone) in enumerate(alone):
            real = am[b].bool()
            assert (full[b][real] - logits).abs().max().item() < ATOL, (side, b)
            assert (chunked[b][real] - logits).abs().max().item() < ATOL, (side, b)
            for layer, r in enumerate(routed):
                assert torch.equal(r[b][real], routed_alone[layer]), (side, b, layer)
                assert not r[b][~real].any(), "padding is never routed"
        if side == "right":  # a padding position outputs the last real token's prediction
            last = am.sum(1) - 1
            for b in range(len(rows)):
                assert torch.equal(full[b, -1], full[b, last[b]])
        counts = rest.past_key_values.kv_counts()
        for i, sym in enumerate(pattern):
            if sym == "*":  # the attention cache holds the real tokens of the current document
                want = [len(r) - (int((r == EOD).nonzero()[-1]) + 1 if documents and (r == EOD).any() else 0)
                        for r in rows]
                assert counts[i].tolist() == want, (side, counts[i], want)


@pytest.mark.parametrize("name", ["hybrid", "ham_learned", "ham_cosine"])
def test_batched_generate_equals_row_by_row(name):
    pattern, router = MODELS[name]
    model = tiny_model(pattern, router)
    rows = sample_rows()
    place_taus(model, rows)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    alone = [model.generate(r[None], **kw)[0, len(r):].tolist() for r in rows]
    for side in ("left", "right"):
        ids, am = pad(rows, side)
        out = model.generate(ids, attention_mask=am, **kw)[:, ids.shape[1]:].tolist()
        assert out == alone, side
        no_cache = model.generate(ids, attention_mask=am, use_cache=False, **kw)[:, ids.shape[1]:].tolist()
        assert no_cache == alone, side
    # without a mask, generate infers it from the pad id (pad 1 != eos 0), as transformers does
    ids, _ = pad(rows, "left")
    assert model.generate(ids, **kw)[:, ids.shape[1]:].tolist() == alone


def test_beam_search_reorders_the_cache():
    model = tiny_model("H*G", "error_l2")
    rows = sample_rows()
    place_taus(model, rows)
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=PAD,
              eos_token_id=None)
    alone = [model.generate(r[None], **kw)[:, len(r):].tolist() for r in rows]
    # the cache reordered by beam_idx == recomputing every beam from its tokens
    assert alone == [model.generate(r[None], use_cache=False, **kw)[:, len(r):].tolist() for r in rows]
    assert any(a[0] != a[1] for a in alone)  # two different beams came back
    ids, am = pad(rows, "left")
    out = model.generate(ids, attention_mask=am, **kw)[:, ids.shape[1]:].tolist()
    assert out == [s for a in alone for s in a]


def test_reorder_cache_moves_every_row_state():
    model = tiny_model("H*G", "error_l2")
    rows = sample_rows()
    ids, am = pad(rows, "left")
    with torch.no_grad():
        out = model(ids, attention_mask=am, use_cache=True)
    cache = out.past_key_values
    before = [(k, s, p) for k, s, p in zip(cache.keys, cache.state, [cache.positions] * 3)]
    idx = torch.tensor([2, 2, 0, 1])
    cache.reorder_cache(idx)
    assert cache.positions.tolist() == [len(rows[i]) for i in idx.tolist()]
    for layer, (k, s, _) in enumerate(before):
        if k is not None:
            assert torch.equal(cache.keys[layer], k[idx])
        if s is not None:
            assert torch.equal(cache.state[layer], s[idx])


def test_pipeline_batch_size_4_prompts_of_different_lengths(tmp_path):
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, EOD)
    model = tiny_model("H*G", "learned", vocab=len(tok))
    model.set_tau(0.5)  # r ~ sigmoid(small): about half of the tokens routed
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = ["def main():", "The license grants you", "Copyright", "Permission is hereby granted, free of charge,",
               "THE SOFTWARE IS PROVIDED", "x"]
    lengths = {len(tok(p).input_ids) for p in prompts}
    assert len(lengths) >= 4, lengths
    pipe = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
    kw = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    batched = [o[0]["generated_text"] for o in pipe(prompts, batch_size=4, **kw)]
    alone = [pipe(p, **kw)[0]["generated_text"] for p in prompts]
    assert batched == alone
    assert len(set(alone)) > 1
    # and against the model's own greedy generation, one prompt at a time
    m = pipe.model
    for p, text in zip(prompts, alone):
        ids = tok(p, return_tensors="pt").input_ids
        want = m.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert text == tok.decode(want, skip_special_tokens=True)


def test_attention_mask_shapes_are_checked():
    model = tiny_model("HH", "error_l2")
    x = torch.randint(2, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 6\]"):
        model(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(x, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long))
    # a pad id outside the vocabulary is never embedded
    y = x.clone()
    y[0, :2] = 10 ** 6
    am = torch.ones(2, 6, dtype=torch.long)
    am[0, :2] = 0
    with torch.no_grad():
        got = model(y, attention_mask=am, use_cache=False).logits[0, 2:]
        want = model(x[:1, 2:], use_cache=False).logits[0]
    assert (got - want).abs().max().item() < ATOL
