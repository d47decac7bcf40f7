"""ham-eval's synthetic recall generators: deterministic per seed, and their answers are right.

The solver below is written from the documented token conventions only (markers, layouts): it
reads an example's tokens, finds the pairs / needles and the query, and computes the answer the
model should give; the generator's answer_mask must mark exactly those tokens. No model here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ham.eval.calibrate import threshold_for_fraction
from megatron_ham.eval.recall import TASKS, TokenSpace, generate, min_length
from megatron_ham.eval.routing import RoutingRecorder

EOD, PAD = 0, 1


def solve(tokens, space: TokenSpace):
    """(answer positions, answer ids) of an example, from its tokens and the marker ids alone."""
    t = [int(x) for x in tokens]
    q = t.index(space.query)  # the only QUERY marker
    assert space.query not in t[q + 1:]
    after = t[q + 1:]
    if space.needle not in t:  # mqar: context pairs k v ..., then QUERY k v k v ...
        context = t[:q]
        pos, ans = [], []
        for j in range(0, len(after), 2):
            k = after[j]
            last = max(i for i in range(len(context) - 1) if context[i] == k)  # the pair's key
            pos.append(q + 2 + j)
            ans.append(context[last + 1])
        return pos, ans
    # niah: QUERY key.. SEP answer..; needles NEEDLE key.. SEP value.. in the context
    sep = after.index(space.sep)
    key = after[:sep]
    n_ans = len(after) - sep - 1
    values = []
    i = 0
    while i < q:
        if t[i] == space.needle:
            s = t.index(space.sep, i + 1)
            values.append((t[i + 1:s], s))
            i = s
        i += 1
    matching = [(s, t_key) for t_key, s in values if t_key == key]
    # all needles carry values of one length: the answer is the matching needles' values in order
    per = n_ans // len(matching)
    ans = [v for s, _ in matching for v in t[s + 1:s + 1 + per]]
    start = q + 1 + sep + 1
    return list(range(start, start + len(ans))), ans


CASES = [
    ("mqar", 80, {}),
    ("mqar", 200, {"num_pairs": 24, "num_queries": 5}),
    ("niah_single", 40, {}),
    ("niah_single", 300, {"key_len": 1, "value_len": 5}),
    ("niah_multikey", 120, {"num_needles": 6}),
    ("niah_multivalue", 120, {"num_needles": 3, "value_len": 2}),
    ("niah_multivalue", 64, {"key_len": 3}),
]


@pytest.mark.parametrize("task,length,params", CASES)
def test_answers_match_a_hand_written_solver(task, length, params):
    space = TokenSpace(500, exclude=(EOD, PAD))
    for seed in range(6):
        ex = generate(task, length, seed, space, **params)
        assert ex.tokens.shape == (length,) and ex.tokens.dtype == np.int64
        assert ex.answer_mask.shape == (length,) and ex.answer_mask.dtype == bool
        pos, ans = solve(ex.tokens, space)
        assert np.nonzero(ex.answer_mask)[0].tolist() == pos, (task, seed)
        assert ex.tokens[ex.answer_mask].tolist() == ans == ex.info["answers"]
        # conventions: every id in the vocabulary, no excluded id, markers only where they belong
        assert ex.tokens.min() >= 0 and ex.tokens.max() < 500
        assert not np.isin(ex.tokens, [EOD, PAD]).any()
        n_needles = 0 if task == "mqar" else len(ex.info["needles"])
        assert (ex.tokens == space.needle).sum() == n_needles
        assert (ex.tokens == space.query).sum() == 1
        assert (ex.tokens == space.sep).sum() == (0 if task == "mqar" else n_needles + 1)
        # the haystack holds none of the example's key / value ids
        kv = {x for group in ex.info["keys"] + ex.info["values"] for x in group}
        inside = np.zeros(length, dtype=bool)
        for a, b in ex.info["needles"] + [ex.info["query"]]:
            inside[a:b] = True
        assert not np.isin(ex.tokens[~inside], list(kv)).any()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task):
    space = TokenSpace(300, exclude=(EOD,))
    a, b = generate(task, 128, 7, space), generate(task, 128, 7, space)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.answer_mask, b.answer_mask)
    assert a.info == b.info
    c = generate(task, 128, 8, space)
    assert not np.array_equal(a.tokens, c.tokens)
    # the length and the task enter the seed too: other examples, not a prefix of the same stream
    d = generate(task, 160, 7, space)
    assert not np.array_equal(a.tokens[:100], d.tokens[:100])
    # pinned (numpy PCG64): a change to the generator would silently change every stored
    # evaluation and every training mixture written from it
    assert a.info["answers"][:3] == PINNED[task]


PINNED = {"mqar": [182, 206, 3], "niah_single": [34, 30, 104], "niah_multikey": [4, 176, 208],
          "niah_multivalue": [189, 39, 60]}


def test_token_space_markers_and_plain_vocab():
    space = TokenSpace(100, exclude=(99, 0))
    assert (space.query, space.needle, space.sep) == (98, 97, 96)
    assert space.markers == {"query": 98, "needle": 97, "sep": 96}
    assert 0 not in space.content and 96 not in space.content and space.content.size == 95
    ex = generate("niah_single", 50, 0, 100)  # an int vocabulary excludes nothing
    assert ex.tokens.max() < 100 and (ex.tokens == 99).sum() == 1  # 99 is QUERY there


def test_depth_places_the_needle():
    space = TokenSpace(1000, exclude=(EOD,))
    for depth in (0.0, 0.5, 1.0):
        ex = generate("niah_single", 400, 1, space, depth=depth)
        a, _ = ex.info["needles"][0]
        n_hay = 400 - (2 + 2 + 3) - (2 + 2 + 3)
        assert a == int(round(depth * n_hay)), (depth, a)


def test_bad_parameters_name_what_is_wrong():
    space = TokenSpace(200, exclude=(EOD,))
    with pytest.raises(ValueError, match="unknown recall task 'mqa'"):
        generate("mqa", 100, 0, space)
    with pytest.raises(ValueError, match=r"mqar: length 20 is too short .* \(needs >= 65"):
        generate("mqar", 20, 0, space)
    assert min_length("mqar") == 65 and min_length("niah_single") == 14
    with pytest.raises(ValueError, match="num_queries 9 > num_pairs 8"):
        generate("mqar", 100, 0, space, num_pairs=8, num_queries=9)
    with pytest.raises(ValueError, match="needs 240 distinct key/value ids but the vocabulary has 196"):
        generate("mqar", 2000, 0, space, num_pairs=120)
    with pytest.raises(ValueError, match="num_needles must be >= 2"):
        generate("niah_multikey", 100, 0, space, num_needles=1)
    with pytest.raises(ValueError, match="depth applies to niah_single only"):
        generate("niah_multikey", 100, 0, space, depth=0.5)
    with pytest.raises(ValueError, match="key_len must be a positive int"):
        generate("niah_single", 100, 0, space, key_len=0)


def test_calibration_threshold_and_routing_recorder():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(1000, generator=g)
    for f in (0.1, 0.25, 0.5, 0.9):
        tau = threshold_for_fraction(s, f)
        assert int((s >= tau).sum()) == round(f * 1000)
        assert not bool((s == tau).any())  # halfway between two scores
    assert threshold_for_fraction(s, 1.0) == float("-inf") and threshold_for_fraction(s, 0.0) == float("inf")
    rec = RoutingRecorder([0, 3], max_samples=500, seed=1)
    for src in ("ppl", "mqar", "mqar"):
        sc = torch.rand(4, 300, generator=g)
        rec.add(src, {0: (sc, sc >= 0.75), 3: (sc, sc >= 0.25), 5: (sc, sc >= 0.0)})
    out = rec.summary({0: 0.75, 3: 0.25})
    assert set(out) == {0, 3}
    assert out[0]["tokens"] == 3600 and abs(out[0]["fraction"] - 0.25) < 0.03
    assert abs(out[3]["fraction"] - 0.75) < 0.03 and set(out[3]["by_source"]) == {"ppl", "mqar"}
    assert out[0]["score_samples"] == 500  # bounded sample
    assert abs(out[0]["quantiles"]["0.5"] - 0.5) < 0.08
    assert sum(out[0]["histogram"]["counts"]) == 500 and len(out[0]["histogram"]["edges"]) == 41
    assert out[0]["token_id_share"] is None  # no tokens given


def test_routing_share_decided_by_the_token_id():
    """token_id_share: 1 for a router that stores a fixed set of ids, ~0 for i.i.d. routing and
    for routing by position (context) on random ids, None when everything or nothing is routed."""
    g = torch.Generator().manual_seed(0)
    rec = RoutingRecorder([0, 1, 2, 3])
    for _ in range(3):
        ids = torch.randint(0, 200, (8, 256), generator=g)
        pos = torch.arange(256).expand(8, 256)
        rec.add("mqar", {0: (ids.float(), ids % 4 == 0),  # a fixed quarter of the vocabulary
                         1: (ids.float(), torch.rand(8, 256, generator=g) < 0.25),  # i.i.d.
                         2: (ids.float(), pos % 4 == 0),  # by position
                         3: (ids.float(), ids >= 0)}, tokens=ids)  # everything
    out = rec.summary({})
    assert out[0]["token_id_share"] == pytest.approx(1.0)
    assert abs(out[1]["token_id_share"]) < 0.1 and abs(out[2]["token_id_share"]) < 0.1
    assert out[3]["token_id_share"] is None
    # ids beyond those seen so far extend the per-id counts; still one decision per id
    rec.add("ppl", {0: (torch.zeros(1, 2), torch.tensor([[True, False]]))}, tokens=torch.tensor([[900, 901]]))
    assert rec.summary({})[0]["token_id_share"] == pytest.approx(1.0)


def test_recall_scorer_on_an_oracle_and_on_its_negation():
    """run_recall's scoring (teacher-forced argmax at logits[i - 1] for answer token i) gives
    accuracy 1 to a model that predicts what the solver computes, and 0 to one that predicts
    anything else: the scorer reads the answer positions the generator marks."""
    from types import SimpleNamespace

    from megatron_ham.eval.recall_suite import RecallPlan, run_recall

    space = TokenSpace(300, exclude=(EOD,))

    class Oracle:
        def __init__(self, shift):
            self.shift = shift  # 0: the solver's answer; 1: the next id (always wrong)

        def forward(self, tokens):  # tokens [b, s] -> logits [b, s, V]
            logits = torch.zeros(*tokens.shape, 300)
            for r in range(tokens.shape[0]):
                for p, a in zip(*solve(tokens[r].numpy(), space)):
                    logits[r, p - 1, (a + self.shift) % 300] = 20.0
            return SimpleNamespace(logits=logits, routing=None)

    plan = RecallPlan(["mqar", "niah_multikey"], [64, 100], samples=5, seed=3, space=space,
                      params={"mqar": {"num_pairs": 8}})
    right = run_recall(Oracle(0), plan, batch_size=2, progress=False)
    wrong = run_recall(Oracle(1), plan, batch_size=2, progress=False)
    assert [r["accuracy"] for r in right] == [1.0] * 4 and [r["exact_match"] for r in right] == [1.0] * 4
    assert [r["accuracy"] for r in wrong] == [0.0] * 4
    assert all(r["answer_nll"] < 0.05 for r in right) and all(r["answer_nll"] > 5 for r in wrong)
    assert right[0]["answer_tokens"] == 5 * 8
