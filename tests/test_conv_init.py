"""model.conv_init: the short conv's init, "uniform" (nn.Conv1d's / fla's default) or "shift"
(k = the previous token, q and v = the current token; docs/results/gdn_learning_probe.md)."""

import pytest
from _dist import run_worker


def test_bad_conv_init_is_named():
    from megatron_ham.models import ModelConfig, SettingError

    with pytest.raises(SettingError, match="key 'conv_init': expected one of \\['uniform', 'shift'\\], got 'eye'"):
        ModelConfig(conv_init="eye").validate()
    assert ModelConfig().conv_init == "uniform"


def test_shift_init_sets_the_recall_taps_and_nothing_else(tmp_path):
    r = run_worker("_conv_init_worker.py", tmp_path)
    assert r["other_params_equal"]  # the RNG draws are the same: only the conv differs
    assert r["uniform"]["finite"] and r["shift"]["finite"]
    for conv, widths, names in zip(r["shift"]["conv"], r["shift"]["widths"], r["shift"]["names"]):
        assert names[:3] == ["q", "k", "v"]
        rows = iter(conv)
        for name, width in zip(names, widths):
            want = [0.0, 0.0, 1.0, 0.0] if name == "k" else [0.0, 0.0, 0.0, 1.0]  # tap 3 = current token
            assert [next(rows) for _ in range(width)] == [want] * width
    for conv in r["uniform"]["conv"]:  # the default is unchanged: U(-1/2, 1/2), not the shift
        flat = [v for row in conv for v in row]
        assert max(abs(v) for v in flat) <= 0.5 and len({round(v, 6) for v in flat}) > 10
