"""The evidence grid runner end to end on CPU at toy scale: two tiny configurations of
recipes/evidence/ (a Transformer and the HAM with the learned router) through the recall mixture
(an IndexedDataset), ham-train, checkpoints and ham-eval, into grid.json; a second invocation
finds everything done; a budget that leaves no time starts nothing and says so."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
        "model.kv_channels=16", "model.mixer_num_heads=2", "model.mixer_key_head_dim=16",
        "model.mixer_value_head_dim=16", "model.seq_length=128", "model.dtype=fp32", "train.train_steps=6",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_interval=3",
        "train.eval_iters=1", "checkpoint.interval=0", "logging.interval=1"]


def _grid(out, configs, *extra, budget=600):
    cmd = [sys.executable, "-m", "megatron_ham.evidence", "--out", out, "--configs", configs, "--seeds", "0",
           "--concurrency", "2", "--budget-s", str(budget), "--reserve-s", "30", "--data-workers", "1",
           "--heldout-tokens", "3000", "--data-arg=--lengths=64,127", "--data-arg=--num-pairs=8",
           "--data-arg=--num-needles=2", "--final-lengths", "256,512", "--over-lengths", "256",
           "--eval-samples", "2", "--kv-sweep", "1", "--kv-sweep-configs", "ham_learned_f25",
           "--write-every-s", "2", "--export", os.path.join(out, "export"), *extra]
    for o in TINY:
        cmd += ["--override", o]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_grid_end_to_end(tmp_path):
    out = str(tmp_path / "grid")
    t0 = time.time()
    p = _grid(out, "transformer,ham_learned_f25")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first = time.time() - t0
    g = json.load(open(os.path.join(out, "export", "grid.json")))
    assert g["schema"] == "megatron-ham-evidence/1"
    assert g["data"]["splits"]["train"]["documents"] > 100
    runs = {r["config"]: r for r in g["runs"]}
    assert set(runs) == {"transformer", "ham_learned_f25"} and all(r["status"] == "done" for r in runs.values())
    for r in runs.values():
        assert r["train"]["steps"] == 6 and r["train"]["rc"] == 0
        assert len(r["curves"]["loss"]) == 6 and len(r["curves"]["valid"]) == 2
        assert {x["step"] for x in r["recall_over_training"]} == {6}
        fin = r["final"]
        assert {(x["task"], x["length"]) for x in fin["recall"]} == {
            (t, L) for t in ("mqar", "niah_single", "niah_multikey", "niah_multivalue") for L in (256, 512)}
        assert all(0.0 <= x["accuracy"] <= 1.0 for x in fin["recall"])
        assert 5.5 < fin["perplexity"]["loss"] < 7.0  # ~ln(512): 6 steps learn next to nothing
    ham = runs["ham_learned_f25"]
    assert ham["model"]["pattern"] == "HH" and ham["model"]["router_score"] == "logit"
    assert set(ham["curves"]["kv"]) == {"0", "1"}
    assert all(0.0 < f < 1.0 for _, f, _ in ham["curves"]["kv"]["0"])
    trace = ham["final"]["trace"]
    assert trace and set(trace["layers"]) == {"0", "1"} and trace["marks"]["needles"]
    assert [s["kv_fraction"] for s in ham["kv_sweep"]] == [1.0]
    assert ham["kv_sweep"][0]["taus"] == {"0": "-inf", "1": "-inf"}
    assert runs["transformer"]["curves"]["kv"] == {} and runs["transformer"]["final"]["trace"] is None
    with tarfile.open(os.path.join(out, "export", "evidence_runs.tar.gz")) as tar:
        names = tar.getnames()
    assert "ham_learned_f25/seed0/eval/final.json" in names and "transformer/seed0/metrics.jsonl" in names
    # resumable: everything is done, nothing is retrained or re-evaluated
    log = os.path.join(out, "ham_learned_f25", "seed0", "train.log")
    size = os.path.getsize(log)
    p = _grid(out, "transformer,ham_learned_f25")
    assert p.returncode == 0 and os.path.getsize(log) == size, p.stdout[-2000:]
    assert "train " not in p.stdout and "eval " not in p.stdout
    # a budget with no time for training: nothing starts, grid.json says so, exit 3
    p = _grid(out, "gdn", budget=20)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    g = json.load(open(os.path.join(out, "grid.json")))
    assert [(r["config"], r["status"]) for r in g["runs"]] == [("gdn", "pending")]
    print(f"first invocation {first:.0f} s")


def test_stagger_waits_for_the_first_run_of_a_configuration(tmp_path):
    """--stagger (default): the other seeds of a configuration start only once its first run has
    finished its first step (its metrics.jsonl has the "startup" record) or has ended; other
    configurations are independent; --no-stagger starts everything."""
    from megatron_ham.evidence.grid import Grid, Run, parse_args

    def grid(*flags):
        g = Grid(parse_args(["--out", str(tmp_path / "g"), *flags]))
        g.runs = [Run(c, s, f"{c}.yaml", str(tmp_path / c / f"seed{s}"), []) for s in (0, 1) for c in ("a", "b")]
        for r in g.runs:
            os.makedirs(r.dir, exist_ok=True)
        return g, {(r.config, r.seed): r for r in g.runs}

    g, runs = grid()
    assert [g.compiled(r) for r in g.runs] == [True, True, False, False]  # the leads only
    runs["a", 0].phase = "training"
    with open(os.path.join(runs["a", 0].dir, "metrics.jsonl"), "w") as f:
        f.write('{"kind": "train", "step": 1}\n{"kind": "star')  # still compiling; a torn line
    assert not g.compiled(runs["a", 1])
    with open(os.path.join(runs["a", 0].dir, "metrics.jsonl"), "w") as f:
        f.write('{"kind": "startup", "step": 1, "time_to_first_step_s": 40.0}\n')
    assert g.compiled(runs["a", 1]) and not g.compiled(runs["b", 1])
    runs["b", 0].phase = "failed"  # an ended lead does not hold the others back
    assert g.compiled(runs["b", 1])
    g, _ = grid("--no-stagger")
    assert all(g.compiled(r) for r in g.runs)


def test_a_training_whose_rendezvous_port_was_taken_starts_again(tmp_path):
    """A training that fails because its MASTER_PORT was taken between choosing and binding it
    (EADDRINUSE in its log; one of 30 runs on the H200, 2026-12-02) goes back to pending, at most
    PORT_RETRIES times; any other failure stays failed."""
    import sys

    from megatron_ham.evidence.grid import PORT_RETRIES, Grid, Run, parse_args

    g = Grid(parse_args(["--out", str(tmp_path / "g")]))
    clash = Run("a", 0, "a.yaml", str(tmp_path / "a"), [])
    other = Run("b", 0, "b.yaml", str(tmp_path / "b"), [])
    g.runs = [clash, other]
    msg = {"a": "DistNetworkError: ... port: 46523, code: -98, name: EADDRINUSE, message: address already in use",
           "b": "RuntimeError: CUDA out of memory"}

    def fail(r):
        os.makedirs(r.dir, exist_ok=True)
        g._launch(r, [sys.executable, "-c", f"import sys; print({msg[r.config]!r}); sys.exit(1)"], "train.log")
        r.phase = "training"
        r.proc.wait()
        g.reap()

    phases = []
    for _ in range(PORT_RETRIES + 1):
        fail(clash)
        phases.append(clash.phase)
    assert phases == ["pending"] * PORT_RETRIES + ["failed"]
    assert clash.record["port_retries"] == PORT_RETRIES and "EADDRINUSE" in clash.record["log_tail"]
    fail(other)
    assert other.phase == "failed" and "port_retries" not in other.record


def test_final_report_of_a_stopped_run_is_redone_after_resuming(tmp_path):
    """run_eval skips a report only when it evaluated the newest checkpoint: a run stopped by the
    budget got a final.json of its last checkpoint; once resumed, the newer one is evaluated."""
    from megatron_ham.evidence.run_eval import _done

    rep = tmp_path / "final.json"
    old, new = str(tmp_path / "ck" / "step_00000200"), str(tmp_path / "ck" / "step_00000800")
    assert not _done(str(rep), old)  # no report yet
    rep.write_text(json.dumps({"model": {"path": old + "/"}}))
    assert _done(str(rep), old) and not _done(str(rep), new)
    rep.write_text("{not json")
    assert not _done(str(rep), old)


def test_report_from_the_committed_grid(tmp_path):
    """python -m megatron_ham.evidence.report on docs/results/grid.json (the 2026-12-02 H200 grid):
    the page has its sections, the plots exist, the held-out loss is the trained (answer) tokens'
    validation loss, the routing traces (learned, error and learned+error routers) are drawn, and
    the summary lists the extra Transformer runs with their own steps and KV fraction."""
    from megatron_ham.evidence.report import heldout_loss, write_report

    grid = json.load(open(os.path.join(REPO, "docs", "results", "grid.json"), encoding="utf-8"))
    notes = tmp_path / "notes.md"
    notes.write_text("## Findings\n\nhand-written\n")
    write_report(grid, str(tmp_path), str(notes), None)
    page = (tmp_path / "results.md").read_text()
    for section in ("## Findings", "## Summary", "## KV fraction trade-off", "## Routing trace on a needle example",
                    "## The trained HAM at other KV fractions", "## Runs"):
        assert section in page, section
    for png in ("accuracy_vs_length", "kv_tradeoff", "routers", "routing_layers", "routing_trace",
                "routing_trace_error", "routing_trace_learnederr", "kv_sweep"):
        assert (tmp_path / f"results_{png}.png").stat().st_size > 1000, png
        assert f"(results_{png}.png)" in page, png
    summary = page.split("## Summary")[1].split("##")[0]
    assert "| Transformer (f=1), 3x steps, lr 1e-3 | 21.0M | 1 | 2400 | 2/2 |" in summary
    err = next(r for r in grid["runs"] if r["config"] == "ham_error_f25" and r["seed"] == 1)
    assert heldout_loss(err) == err["curves"]["valid"][-1][1] < 1.0  # answer tokens, not all tokens
    assert err["final"]["perplexity"]["loss"] > 6.0
