"""The evidence grid runner: every configuration of recipes/evidence/ x every seed, through the
real path, several runs at once on one machine, within a wall-clock budget.

    python -m megatron_ham.evidence --out runs/evidence --seeds 0,1,2 --budget-s 520 --concurrency 12

Steps:
  1. the recall mixture (data_prep.recall_mixture) in OUT/data, unless it is already there;
  2. one `ham-train` process per run (configuration, seed) in OUT/<config>/seed<k>/ (seed k:
     train.seed = 1234 + k, model.router_seed = k; every configuration of a seed reads the same
     tokens in the same order), then one `run_eval` process on its checkpoints (ham-eval);
     up to --concurrency processes at a time, seed-major (all configurations of seed 0 first);
  3. OUT/grid.json (collect.py) rewritten as runs finish, copied to --export when given.
Fitting the budget (--calibrate-steps N): first every configuration of the first seed trains N
steps at once (OUT/calibration; this also compiles and caches every kernel the grid uses, the
evaluation's lengths included); their step times and memory give how many runs fit at once and
how many steps every run can take so that the grid ends within the budget (the same number for
all: train.train_steps, with warm-up, checkpoints and validation scaled to it; fit.py).
Resumable: a run whose run.json says "done" is skipped, an interrupted training resumes from its
latest checkpoint, reports already written are not redone. A training whose rendezvous port was
taken before it could bind it (EADDRINUSE) starts again on another port (twice at most).
Budget: after --budget-s minus
--reserve-s no training starts and the running ones get SIGTERM (ham-train checkpoints and exits
75: "stopped"); their checkpoints are still evaluated; at --budget-s everything left is ended
(SIGTERM, then SIGKILL) and grid.json says what finished. Exit codes: 0 every run done, 3 some
runs stopped / failed / not started (grid.json has the rest), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_ham.distributed import free_port

from .collect import collect, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED_BASE = 1234
EXIT_STOPPED = 75  # ham-train's exit code after a checkpoint on SIGTERM / SIGUSR1


class DataError(ValueError):
    """The recall mixture could not be built from the given --data-arg / settings."""


def log(msg: str) -> None:
    print(f"[evidence {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_json(path: str, obj) -> None:
    from megatron_ham.eval.report import write_json

    write_json(path, obj)


PORT_CLASH = "EADDRINUSE"  # in a training's log: its MASTER_PORT was taken
PORT_RETRIES = 2  # new starts of a training whose rendezvous port was taken


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class Run:
    """One (configuration, seed) run and its processes."""

    config: str
    seed: int
    recipe: str
    dir: str
    overrides: List[str]
    steps: int = 0
    record: dict = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None
    phase: str = "pending"  # pending | training | trained | evaluating | done | stopped | failed
    first_step_done: bool = False  # its metrics.jsonl has the "startup" record (--stagger)
    # "trained": checkpoints to evaluate (training finished, or stopped: record["stopped"])
    started: float = 0.0
    signalled: bool = False

    def save(self) -> None:
        self.record["status"] = self.phase if self.phase in ("done", "stopped", "failed") else (
            "running" if self.phase in ("training", "evaluating", "trained") else "pending")
        self.record["phase"] = self.phase
        _atomic_json(os.path.join(self.dir, "run.json"), self.record)


class Grid:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.out = os.path.abspath(args.out)
        self.data_dir = os.path.join(self.out, "data")
        self.runs: List[Run] = []
        self.calibration: Optional[dict] = None
        self.last_write = 0.0
        self.device = self._device()
        self.env = self._env()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _device() -> str:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def _env(self) -> Dict[str, str]:
        cache = os.path.abspath(self.args.cache_dir or os.path.join(self.out, "cache"))
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TILELANG_CACHE_DIR=os.path.join(cache, "tilelang"),
                   TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def elapsed(self) -> float:
        return time.time() - self.t0

    def make_data(self, recipe_cfg) -> None:
        a = self.args
        t = recipe_cfg.train
        # what the steps read, and enough documents that the 2 % validation split is not empty
        # (GPTDataset loops forever on a split without tokens)
        s = recipe_cfg.model.seq_length
        need = max(int(t.train_steps * t.global_batch_size * s * 1.02) + 1, 300 * s)
        from data_prep import recall_mixture

        # documents packed whole into rows of the recipes' seq_length: ham-train's samples never
        # cut one (a cut MQAR document keeps queries without their pairs; docs/results.md); the
        # answer masks when the recipes train on the answers (data.loss_mask: blend)
        argv = ["--out", self.data_dir, "--vocab-size", str(recipe_cfg.model.vocab_size),
                "--eod-id", str(a.eod_id), "--train-tokens", str(a.train_tokens or need), "--heldout-tokens",
                str(a.heldout_tokens), "--workers", str(a.data_workers), "--no-progress",
                "--seq-length", str(s), *(["--loss-mask"] if recipe_cfg.data.loss_mask == "blend" else []),
                *a.data_arg]
        log(f"data: recall_mixture {' '.join(argv)}")
        t0 = time.time()
        try:
            m = recall_mixture.run(recall_mixture.build_parser().parse_args(argv))
        except ValueError as e:
            raise DataError(f"the recall mixture: {e}") from e
        tr = m["splits"]["train"]
        log(f"data ready in {time.time() - t0:.1f} s: {tr['documents']} training documents, {tr['tokens']} tokens")

    def plan(self, seeds=None, extra: Optional[List[str]] = None) -> None:
        """The runs of `seeds` (default --seeds) with these extra overrides, records written."""
        from megatron_ham.models.accounting import count_parameters
        from megatron_ham.training.config import load_config

        a = self.args
        blend = os.path.join(self.data_dir, "blend.json")
        first = None
        self.runs = []
        for seed in seeds if seeds is not None else a.seeds:
            for name in a.configs:
                recipe = os.path.join(a.recipes, f"{name}.yaml")
                d = os.path.join(self.out, name, f"seed{seed}")
                ov = [f"data.blend={blend}", f"checkpoint.dir={d}/checkpoints", f"logging.jsonl={d}/metrics.jsonl",
                      f"logging.tensorboard_dir={d}/tb", f"train.seed={SEED_BASE + seed}",
                      f"model.router_seed={seed}", *a.override, *(extra or [])]
                cfg = load_config(recipe, ov)
                first = first or cfg
                m = cfg.model
                r = Run(name, seed, recipe, d, ov, steps=cfg.train.train_steps)
                old = {}
                try:
                    old = json.load(open(os.path.join(d, "run.json"), encoding="utf-8"))
                except (OSError, ValueError):
                    pass
                r.record = {"config": name, "seed": seed, "recipe": os.path.relpath(recipe, REPO),
                            "overrides": ov, "train_steps": cfg.train.train_steps,
                            "model": {"architecture": m.architecture, "pattern": m.resolved_pattern(),
                                      "router": m.router if "H" in m.resolved_pattern() else None,
                                      "router_score": m.router_score if m.router == "learned" else None,
                                      "router_input": m.router_input if m.router == "learned" else None,
                                      "kv_fraction": m.kv_fraction if "H" in m.resolved_pattern() else None,
                                      "parameters": count_parameters(m)["total"]}}
                for k in ("train_wall_s", "eval_wall_s", "rc", "final_step"):
                    if k in old:
                        r.record[k] = old[k]
                if old.get("status") == "done":
                    r.phase = "done"
                elif self._final_step(r) == cfg.train.train_steps:
                    r.phase = "trained"  # trained before; its evaluation did not finish
                os.makedirs(d, exist_ok=True)
                r.save()
                self.runs.append(r)

    # ------------------------------------------------------------------ processes
    def _launch(self, r: Run, cmd: List[str], logname: str, extra_env: Optional[dict] = None) -> None:
        env = dict(self.env, **(extra_env or {}))
        f = open(os.path.join(r.dir, logname), "ab")
        r.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        f.close()
        r.started = time.time()

    def start_training(self, r: Run) -> None:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        self._launch(r, [sys.executable, "-m", "megatron_ham.train", r.recipe, *r.overrides], "train.log", env)
        r.phase = "training"
        r.signalled = False
        r.save()
        log(f"train {r.config} seed {r.seed} (pid {r.proc.pid})")

    def start_eval(self, r: Run) -> None:
        a = self.args
        from .run_eval import EVAL_ARGUMENTS

        cmd = [sys.executable, "-m", "megatron_ham.evidence.run_eval", "--run", r.dir,
               "--heldout", os.path.join(self.data_dir, "heldout")]
        for name in EVAL_ARGUMENTS:
            cmd += ["--" + name.replace("_", "-"), str(getattr(a, name))]
        if r.config in a.kv_sweep_configs and (r.seed in a.kv_sweep_seeds):
            cmd += ["--kv-sweep", a.kv_sweep]
        if a.prune:
            cmd.append("--prune")
        self._launch(r, cmd, "eval.log")
        r.phase = "evaluating"
        r.save()
        log(f"eval {r.config} seed {r.seed} (pid {r.proc.pid})")

    def compiled(self, r: Run) -> bool:
        """--stagger: whether `r` may start. The first run of a configuration starts at once; the
        others wait until it has finished its first step (its kernels are then in the shared
        compile cache, `train.compile_cache_dir`) or has ended. On the H200 (2026-12-02) 24
        processes compiling from an empty cache at once took 305 s each to their first step."""
        if not self.args.stagger:
            return True
        lead = next(x for x in self.runs if x.config == r.config)
        if lead is r or lead.phase not in ("pending", "training"):
            return True
        if lead.phase == "pending":
            return False
        if not lead.first_step_done:
            lead.first_step_done = any(rec.get("kind") == "startup"
                                       for rec in read_metrics(os.path.join(lead.dir, "metrics.jsonl")))
        return lead.first_step_done

    def _final_step(self, r: Run) -> Optional[int]:
        from megatron_ham.evidence.run_eval import checkpoints

        ck = checkpoints(r.dir)
        return ck[-1][0] if ck else None

    def reap(self) -> bool:
        changed = False
        for r in self.runs:
            if r.proc is None or r.proc.poll() is None:
                continue
            rc, dt = r.proc.returncode, time.time() - r.started
            r.proc = None
            changed = True
            if r.phase == "training":
                r.record["rc"] = rc
                r.record["train_wall_s"] = round(r.record.get("train_wall_s", 0.0) + dt, 1)
                if rc == 0:
                    r.phase = "trained"
                elif rc == EXIT_STOPPED or r.signalled:
                    r.record["stopped"] = True
                    r.phase = "trained" if self._final_step(r) else "stopped"
                else:
                    r.record["log_tail"] = _tail(os.path.join(r.dir, "train.log"))
                    r.phase = "failed"
                    if PORT_CLASH in r.record["log_tail"] and r.record.get("port_retries", 0) < PORT_RETRIES:
                        # the rendezvous port, free when chosen, was taken before the run bound it
                        # (H200, 2026-12-02: one of 30 runs); start it again on another port
                        r.record["port_retries"] = r.record.get("port_retries", 0) + 1
                        r.phase = "pending"
                log(f"train {r.config} seed {r.seed}: rc {rc} after {dt:.0f} s -> {r.phase}"
                    + (" (rendezvous port taken: again on another)" if r.phase == "pending" else ""))
            elif r.phase == "evaluating":
                r.record["eval_wall_s"] = round(dt, 1)
                r.record["eval_rc"] = rc
                r.record["final_step"] = self._final_step(r)
                if rc != 0:  # 1: some ham-eval call failed (the others ran): see eval.log
                    r.record["eval_log_tail"] = _tail(os.path.join(r.dir, "eval.log"))
                r.phase = "stopped" if r.record.get("stopped") else ("done" if rc in (0, 1) else "failed")
                log(f"eval {r.config} seed {r.seed}: rc {rc} after {dt:.0f} s -> {r.phase}")
            r.save()
        return changed

    def running(self) -> List[Run]:
        return [r for r in self.runs if r.proc is not None]

    def signal_trainings(self) -> None:
        for r in self.running():
            if r.phase == "training" and not r.signalled:
                try:
                    # SIGTERM, not SIGUSR1: on the H200 (2026-12-02) SIGUSR1 reached no GDN / HAM
                    # process (training/signals.py StopRequest.reassert), SIGTERM reached all
                    os.killpg(r.proc.pid, signal.SIGTERM)
                    r.signalled = True
                    log(f"budget: SIGTERM to {r.config} seed {r.seed}")
                except ProcessLookupError:
                    pass

    def end_all(self) -> None:
        procs = self.running()
        for r in procs:
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(r.proc.poll() is None for r in procs):
            time.sleep(0.2)
        for r in procs:
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                r.proc.wait()
            log(f"budget: ended {r.config} seed {r.seed} ({r.phase})")
            r.record["stopped"] = True
            r.phase = "stopped"
            r.proc = None
            r.save()

    # ------------------------------------------------------------------ results
    def write(self, force: bool = False) -> None:
        if not force and time.time() - self.last_write < self.args.write_every_s:
            return
        self.last_write = time.time()
        a = self.args
        settings = {k: (v if not isinstance(v, tuple) else list(v)) for k, v in vars(a).items()}
        settings["calibration"] = self.calibration
        grid = collect(self.out, settings, self.elapsed(), self.device, [r.dir for r in self.runs])
        path = os.path.join(self.out, "grid.json")
        _atomic_json(path, grid)
        if a.export:
            os.makedirs(a.export, exist_ok=True)
            _atomic_json(os.path.join(a.export, "grid.json"), grid)

    def archive(self) -> None:
        """A tarball of every run's small files (logs, metrics, run.json, eval reports) in --export."""
        if not self.args.export:
            return
        path = os.path.join(self.args.export, "evidence_runs.tar.gz")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for r in self.runs:
                for pat in ("run.json", "metrics.jsonl", "train.log", "eval.log", "eval/*.json"):
                    for f in glob.glob(os.path.join(r.dir, pat)):
                        tar.add(f, arcname=os.path.relpath(f, self.out))
            for f in (os.path.join(self.out, "data", "recall_mixture.json"), os.path.join(self.out, "grid.json")):
                if os.path.exists(f):
                    tar.add(f, arcname=os.path.relpath(f, self.out))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ the loop
    def calibrate(self) -> List[str]:
        """Train every configuration of the first seed for --calibrate-steps steps at once, then
        return the overrides that fit the grid into the budget (fit.py)."""
        from .fit import fit_steps, measure

        a = self.args
        out, self.out = self.out, os.path.join(self.out, "calibration")
        n = a.calibrate_steps
        self.plan(seeds=[a.seeds[0]], extra=[f"train.train_steps={n}", f"train.warmup_steps={max(1, n // 10)}",
                                             "train.eval_interval=0", "checkpoint.interval=0"])
        saved = (a.eval_samples, a.kv_sweep_configs, a.prune)
        a.eval_samples, a.kv_sweep_configs, a.prune = 1, [], False  # compile the evaluation's shapes only
        self.loop(a.budget_s - a.reserve_s)
        a.eval_samples, a.kv_sweep_configs, a.prune = saved
        m = measure([r.dir for r in self.runs])
        self.out = out
        runs = len(a.seeds) * len(a.configs)
        self.calibration = fit_steps(m, runs=runs, concurrency=a.concurrency, left_s=a.budget_s - self.elapsed(),
                                     reserve_s=a.reserve_s, gpu_mem_gib=a.gpu_mem_gib,
                                     min_steps=a.min_steps, max_steps=a.max_steps)
        c = self.calibration
        log(f"calibration: {json.dumps(m)}")
        log(f"fit: {c['steps']} steps, {c['concurrency']} at once, {c['waves']} wave(s), "
            f"~{c['step_time_s']:.3f} s/step under load ({c['reason']})")
        a.concurrency = c["concurrency"]
        return c["overrides"]

    def loop(self, soft: float) -> None:
        a = self.args
        hard = a.budget_s - a.end_s
        while True:
            changed = self.reap()
            now = self.elapsed()
            if now >= hard:
                log(f"budget: {now:.0f} s >= {hard:.0f} s: ending what is left")
                self.end_all()
                break
            if now >= soft:
                self.signal_trainings()
            free = a.concurrency - len(self.running())
            for r in self.runs:  # evaluations first: they finish runs
                if free > 0 and r.proc is None and r.phase == "trained":
                    self.start_eval(r)
                    free -= 1
            for r in self.runs:
                if free > 0 and now < soft and r.proc is None and r.phase == "pending" and self.compiled(r):
                    self.start_training(r)
                    free -= 1
            waiting = [r for r in self.runs if r.phase == "trained" or (r.phase == "pending" and now < soft)]
            if not self.running() and not waiting:
                break
            self.write(force=changed)
            time.sleep(a.poll_s)

    def run(self) -> int:
        from megatron_ham.training.config import load_config

        a = self.args
        cfg = load_config(os.path.join(a.recipes, f"{a.configs[0]}.yaml"), list(a.override))
        if a.calibrate_steps:  # the data for the longest grid the fit may choose
            cfg.train.train_steps = max(cfg.train.train_steps, a.max_steps)
        self.make_data(cfg)  # does nothing when OUT/data holds this mixture already
        extra = self.calibrate() if a.calibrate_steps else []
        self.plan(extra=extra)
        self.loop(a.budget_s - a.reserve_s)
        self.write(force=True)
        self.archive()
        counts: Dict[str, int] = {}
        for r in self.runs:
            counts[r.phase] = counts.get(r.phase, 0) + 1
        log(f"finished in {self.elapsed():.0f} s: {counts}; {os.path.join(self.out, 'grid.json')}")
        return 0 if counts.get("done", 0) == len(self.runs) else 3


def _list(text: str, cast=str):
    return [cast(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_ham.evidence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1] + "\nThen: python -m megatron_ham.evidence.report "
                                "--grid OUT/grid.json (docs/results.md, plots).")
    p.add_argument("--out", required=True, help="grid directory (data, one dir per run, grid.json)")
    p.add_argument("--recipes", default=os.path.join(REPO, "recipes", "evidence"),
                   help="recipe directory (default recipes/evidence)")
    p.add_argument("--configs", default="", help="comma list of recipe names (default: every *.yaml not "
                   "starting with _)")
    p.add_argument("--seeds", default="0,1,2", help="seeds (0,1,2)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run (repeatable), e.g. train.train_steps=600")
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock budget in seconds (3600)")
    p.add_argument("--reserve-s", type=float, default=60.0,
                   help="seconds before the budget when trainings are stopped so evaluations can run (60)")
    p.add_argument("--end-s", type=float, default=5.0, help="seconds before the budget when everything ends (5)")
    p.add_argument("--concurrency", type=int, default=2, help="processes at a time (trainings + evaluations; 2)")
    p.add_argument("--export", help="copy grid.json there as it changes, and a tarball of the runs' logs at the end")
    p.add_argument("--cache-dir", help="compiled-kernel caches shared by the processes (default OUT/cache)")
    p.add_argument("--prune", action="store_true", help="delete evaluated intermediate checkpoints")
    p.add_argument("--stagger", action=argparse.BooleanOptionalAction, default=True,
                   help="start the other runs of a configuration only after its first run has done "
                        "its first step, so they load its compiled kernels (default on)")
    d = p.add_argument_group("data (data_prep.recall_mixture)")
    d.add_argument("--eod-id", type=int, default=0, help="EOD id (0, the sample tokenizer's)")
    d.add_argument("--train-tokens", type=int, default=0, help="training tokens (default: what the steps read)")
    d.add_argument("--heldout-tokens", type=int, default=200_000, help="held-out tokens (200000)")
    d.add_argument("--data-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="generator processes")
    d.add_argument("--data-arg", action="append", default=[], metavar="ARG",
                   help="extra recall_mixture argument (repeatable), e.g. --data-arg=--lengths=256,512")
    e = p.add_argument_group("evaluation (ham-eval via megatron_ham.evidence.run_eval)")
    from .run_eval import add_eval_arguments

    add_eval_arguments(e)
    e.add_argument("--kv-sweep", default="0.05,0.1,0.25,0.5,1", help="KV fractions of the sweep")
    e.add_argument("--kv-sweep-configs", default="ham_learned_f25,ham_random_f25",
                   help="configurations whose final models are swept")
    e.add_argument("--kv-sweep-seeds", default="0", help="seeds whose final models are swept (0)")
    f = p.add_argument_group("fitting the budget (fit.py)")
    f.add_argument("--calibrate-steps", type=int, default=0,
                   help="train every configuration this many steps first and fit train.train_steps to "
                        "the budget (0: use the recipes' steps)")
    f.add_argument("--gpu-mem-gib", type=float, default=0.0, help="memory to share (default: the GPU's)")
    f.add_argument("--min-steps", type=int, default=100, help="fewest steps to fit (100)")
    f.add_argument("--max-steps", type=int, default=4000, help="most steps to fit (4000)")
    x = p.add_argument_group("loop")
    x.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    x.add_argument("--write-every-s", type=float, default=15.0, help="grid.json refresh interval (15)")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    try:
        a.seeds = _list(a.seeds, int)
        a.kv_sweep_seeds = _list(a.kv_sweep_seeds, int)
    except ValueError:
        p.error("--seeds / --kv-sweep-seeds: comma-separated ints")
    a.kv_sweep_configs = _list(a.kv_sweep_configs)
    if not os.path.isdir(a.recipes):
        p.error(f"--recipes {a.recipes}: not a directory")
    names = sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(a.recipes, "*.yaml"))
                   if not os.path.basename(f).startswith("_"))
    a.configs = _list(a.configs) or names
    missing = [c for c in a.configs if c not in names]
    if missing:
        p.error(f"--configs: no recipe {missing[0]}.yaml in {a.recipes} (have: {', '.join(names)})")
    if a.concurrency < 1 or a.budget_s <= 0 or not a.seeds:
        p.error("--concurrency >= 1, --budget-s > 0 and at least one seed are needed")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_ham.training.config import ConfigError

    try:
        return Grid(args).run()
    except (ConfigError, DataError) as e:
        print(f"evidence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
