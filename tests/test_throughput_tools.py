"""Issue 15's tools on CPU: the persistent compile cache (config keys, node-local copy, a cold
then a warm run of the real loop through tools/bench_recipes.py in both batch modes), and
tools/profile_step.py's category table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ham.training import compile_cache
from megatron_ham.training.config import ConfigError, load_config
from _dist import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_cpu.yaml")


@pytest.mark.parametrize("overrides, key", [
    (["train.compile_cache_local=/tmp/x"], "train.compile_cache_local"),  # no shared dir
    (["train.compile_cache_dir=/tmp/cc", "train.compile_cache_local=/tmp/cc"], "train.compile_cache_local"),
    (["train.compile_cache_dir=/tmp/cc", "train.compile_cache_local=/tmp/cc/local"], "train.compile_cache_local"),
    (["train.compile_cache_dir=' '"], "train.compile_cache_dir"),
])
def test_compile_cache_keys_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, overrides)


def test_recipe_load_leaves_compilers_unimported():
    """The premise of applying the cache after the recipe is read: nothing that reads the cache
    variables is imported by then."""
    code = ("import sys; from megatron_ham.training.config import load_config; "
            f"load_config({TINY!r}, ['train.compile_cache_dir=/tmp/x']); "
            "print([m for m in ('triton', 'tilelang', 'torch._inductor', 'torch._dynamo', 'megatron.core') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unusable_cache_dir_exits_2():
    p = subprocess.run([sys.executable, "-m", "megatron_ham.train", TINY, "train.compile_cache_dir=/proc/no/cc"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "train.compile_cache_dir" in p.stderr and "/proc/no" in p.stderr, p.stderr


def test_node_local_copy_and_sync_back(tmp_path, monkeypatch):
    for var in (*compile_cache.CACHE_DIRS, *compile_cache.SWITCHES):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    monkeypatch.setattr(compile_cache, "_STATE", compile_cache.CacheState())
    shared, local, outside = tmp_path / "shared", tmp_path / "local", tmp_path / "outside"
    (shared / "triton" / "abc").mkdir(parents=True)
    (shared / "triton" / "abc" / "k.cubin").write_bytes(b"x" * 100)
    outside.mkdir()
    (outside / "secret").write_text("no")
    os.symlink(outside / "secret", shared / "triton" / "link")
    os.symlink(outside, shared / "linkdir")

    st = compile_cache.configure(str(shared), str(local))
    assert st.copied_in == 1 and st.warm and st.files_at_start == 1 and st.bytes_at_start == 100
    assert (local / "triton" / "abc" / "k.cubin").read_bytes() == b"x" * 100
    assert not (local / "triton" / "link").exists() and not (local / "linkdir").exists()
    assert os.environ["TRITON_CACHE_DIR"] == str(local / "triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(local / "inductor")
    assert os.environ["TILELANG_CACHE_DIR"] == str(local / "tilelang")
    assert "warm: 1 files" in st.describe()
    # a second rank of the node finds nothing to copy; a new entry goes back at exit, once
    assert compile_cache.copy_missing(str(shared), str(local)) == 0
    (local / "inductor" / "fx").mkdir(parents=True)
    (local / "inductor" / "fx" / "entry").write_text("graph")
    assert compile_cache.sync_back(st) == 1 and compile_cache.sync_back(st) == 0
    assert (shared / "inductor" / "fx" / "entry").read_text() == "graph"
    assert not [p for p in shared.rglob("*") if p.name.startswith(".ham-sync-")]


@pytest.mark.slow
def test_bench_recipes_both_modes_cold_then_warm_cache(tmp_path):
    """tools/bench_recipes.py on CPU, both modes, with a compile cache and Megatron's compiled
    SwiGLU (model.fusions on): the first run compiles into the empty cache, the second (same
    micro-batch shape) loads every graph from it."""
    cache, out = tmp_path / "cc", tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_recipes.py"), "--recipes", "recipes/tiny_cpu.yaml",
           "--set", "model.seq_length=64", "model.num_layers=1", "model.architecture=transformer",
           'model.fusions="on"', "train.micro_batch_size=1", f"train.compile_cache_dir={cache}",
           "--steps", "1", "--warmup", "0", "--recipe-steps", "1", "--recipe-warmup", "0", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    mbs1, recipe = json.loads(out.read_text())
    assert (mbs1["mode"], mbs1["micro_batches_per_step"]) == ("mbs1", 1)
    assert (recipe["mode"], recipe["micro_batches_per_step"]) == ("recipe", 8)  # tiny_cpu: 8 sequences/step
    assert mbs1["tokens_per_s_per_gpu"] > 0 and recipe["tokens_per_s_per_gpu"] > 0
    assert not mbs1["cache_warm"] and recipe["cache_warm"]
    c1, c2 = mbs1["compile_counters"], recipe["compile_counters"]
    assert c1["fxgraph_cache_miss"] > 0 and c1["fxgraph_cache_hit"] == 0
    assert c2["fxgraph_cache_hit"] > 0 and c2["fxgraph_cache_miss"] == 0
    assert list((cache / "inductor").rglob("*")), "the Inductor cache stayed empty"
    assert 0 < mbs1["setup_s"] < mbs1["ttfs_s"]
    assert "recipe" in p.stdout and "cold" in p.stdout and "warm" in p.stdout
    # the host it ran on, with its per-operator overhead: the same record on every row
    m = mbs1["machine"]
    assert m == recipe["machine"] and m["logical_cpus"] >= 1 and 0 < m["dispatch_us"] < 1000 and m["cpu"]
    assert p.stdout.count("host: ") == 2 and "us per eager PyTorch operator" in p.stdout


@pytest.mark.slow
def test_bench_recipes_data_parallel_scaling(tmp_path):
    """--gpus 1 2: the same recipe again as 2 data-parallel processes (torchrun; gloo on the CPU),
    one sequence per GPU in mbs1 mode, and its tokens/s per GPU over the 1-process run's."""
    out = tmp_path / "bench.json"
    tool = os.path.join(REPO, "tools", "bench_recipes.py")
    cmd = [sys.executable, tool, "--recipes", "recipes/tiny_cpu.yaml", "--set", "model.seq_length=64",
           "model.num_layers=1", "--mode", "mbs1", "--steps", "1", "--warmup", "1", "--gpus", "1", "2",
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = json.loads(out.read_text())
    assert (one["gpus"], one["global_batch_size"], two["gpus"], two["global_batch_size"]) == (1, 1, 2, 2)
    assert two["tokens_per_s_per_gpu"] > 0 and two["dp_scaling"] == pytest.approx(
        two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"])
    assert "data-parallel scaling recipes/tiny_cpu.yaml (mbs1): 1 -> 2 GPUs" in p.stdout
    # past --timeout, the run is stopped with the workers torchrun started (their own sessions)
    mark = f"train.seed={os.getpid() % 100000 + 7}"  # names this test's processes
    t = subprocess.run([*cmd[:cmd.index("--out")], "--set", "model.seq_length=64", "model.num_layers=1", mark,
                        "--timeout", "3"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert t.returncode == 1 and "FAILED (rc timeout)" in t.stdout, t.stdout[-2000:]
    left = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    for bad in (["--gpus", "0"], ["--gpus", "2", "2"]):
        b = subprocess.run([sys.executable, tool, *bad], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        assert b.returncode == 2 and "--gpus" in b.stderr, b.stderr


@pytest.mark.slow
def test_bench_recipes_against_a_baseline_revision(tmp_path):
    """--baseline HEAD --repeat 2: the recipe from the committed tree (extracted by the tool) and
    from this checkout, interleaved B A A B; each side is the mean of its two runs, with
    after/before; the baseline's runs ran the extracted megatron_ham, not this checkout's; a
    revision git does not know is an error naming it (exit 2)."""
    out = tmp_path / "bench.json"
    tool = os.path.join(REPO, "tools", "bench_recipes.py")
    cmd = [sys.executable, tool, "--recipes", "recipes/tiny_cpu.yaml", "--set", "model.seq_length=64",
           "model.num_layers=1", "--mode", "recipe", "--recipe-steps", "1", "--recipe-warmup", "0",
           "--baseline", "HEAD", "--repeat", "2", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cur, base = json.loads(out.read_text())
    assert (cur["side"], base["side"]) == ("current", "baseline")
    assert len(cur["runs"]) == len(base["runs"]) == 2
    assert cur["tokens_per_s_per_gpu"] == pytest.approx(sum(cur["runs"]) / 2)
    assert cur["vs_baseline"] == pytest.approx(cur["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"])
    assert cur["code"] == os.path.join(REPO, "megatron_ham")
    assert base["code"].endswith(os.path.join("baseline", "megatron_ham")) and "bench_recipes_" in base["code"]
    sides = [json.loads(l)["side"] for l in p.stdout.splitlines() if l.startswith('{"recipe"')]
    assert sides == ["baseline", "current", "current", "baseline"]
    assert "against the baseline HEAD" in p.stdout
    b = subprocess.run([sys.executable, tool, "--recipes", "recipes/tiny_cpu.yaml", "--baseline", "no-such-rev"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert b.returncode == 2 and "--baseline 'no-such-rev': git archive failed" in b.stderr, b.stderr[-2000:]
    b = subprocess.run([sys.executable, tool, "--recipes", "recipes/tiny_cpu.yaml", "--baseline=--output=x.tar"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert b.returncode == 2 and "a git revision (a commit, branch or tag) is expected" in b.stderr, b.stderr[-2000:]
    assert not (tmp_path / "x.tar").exists()


def test_compare_profiles(tmp_path):
    """tools/compare_profiles.py: two profile_step.py summaries of different global batches in ms
    per sequence, each category with after - before and the change; the items that moved most,
    one listed on one side only shown with "-" (not among that profile's biggest), not as 0; a
    file that is not a summary: exit 2 naming the file and the key."""
    def summary(gbs, gemm, norms, items, unprofiled=None):
        s = {"global_batch_size": gbs, "busy_ms_per_step": gemm + norms, "categories": [
            {"category": "GEMM", "ms_per_step": gemm, "top": [["nvjet_a", gemm]]},
            {"category": "norms/elementwise", "ms_per_step": norms, "top": items}]}
        if unprofiled is not None:
            s["unprofiled_step_ms"] = unprofiled
        return s

    before = summary(4, 400.0, 200.0, [["softmax_old", 40.0], ["add", 20.0]], unprofiled=620.0)
    after = summary(2, 200.0, 80.0, [["add", 12.0], ["new_kernel", 2.0]])
    a, b = tmp_path / "before.json", tmp_path / "after.json"
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(after))
    tool = os.path.join(REPO, "tools", "compare_profiles.py")
    p = subprocess.run([sys.executable, tool, str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {l[:24].strip(): l[24:].split() for l in p.stdout.splitlines()[:6]}
    assert rows["GEMM"] == ["100.00", "100.00", "+0.00", "+0.0%"]                # 400 / 4 vs 200 / 2
    assert rows["norms/elementwise"] == ["50.00", "40.00", "-10.00", "-20.0%"]
    assert rows["GPU busy"] == ["150.00", "140.00", "-10.00", "-6.7%"]
    assert rows["step (unprofiled)"] == ["155.00", "-"]                        # after has none
    moved = [l for l in p.stdout.splitlines() if " / " in l and not l.startswith("category")]
    assert moved[0].split()[-2:] == ["10.00", "-"] and "softmax_old" in moved[0]   # only before
    assert "norms/elementwise / add" in moved[1] and moved[1].split()[-2:] == ["+1.00", "+20.0%"]  # 20 / 4 -> 12 / 2
    assert "new_kernel" in moved[2] and moved[2].split()[-2:] == ["-", "1.00"]
    del before["busy_ms_per_step"]
    a.write_text(json.dumps(before))
    p = subprocess.run([sys.executable, tool, str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"{a}: not a profile_step.py summary: no key 'busy_ms_per_step'" in p.stderr


@pytest.mark.slow
def test_profile_step_against_a_baseline_revision(tmp_path):
    """profile_step.py --baseline HEAD: the committed tree's profile_step.py profiles first (a
    subprocess on the extracted tree), then this checkout, and the comparison table ends the
    output; --out holds both summaries. A revision git does not know: exit 2 naming it."""
    out = tmp_path / "prof.json"
    tool = os.path.join(REPO, "tools", "profile_step.py")
    cmd = [sys.executable, tool, TINY, "--set", "model.num_layers=1", "model.seq_length=64",
           "train.global_batch_size=2", "train.micro_batch_size=1", "--steps", "1", "--warmup", "1",
           "--baseline", "HEAD", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    base = s["baseline"]
    assert base["revision"] == "HEAD" and base["summary"]["global_batch_size"] == 2
    assert [r["category"] for r in base["summary"]["categories"]] == [r["category"] for r in s["categories"]]
    assert "[profile] the baseline HEAD, from " in p.stdout and "profile_step_" in p.stdout
    tail = p.stdout[p.stdout.index("against the baseline HEAD:"):]
    assert "ms per sequence (before: global batch 2, after: 2)" in tail and "GEMM" in tail
    b = subprocess.run(cmd[:cmd.index("--baseline")] + ["--baseline", "no-such-rev"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert b.returncode == 2 and "--baseline 'no-such-rev': git archive failed" in b.stderr, b.stderr[-2000:]


@pytest.mark.slow
def test_profile_step_cpu(tmp_path):
    out = tmp_path / "prof.json"
    cmd = [sys.executable, os.path.join(REPO, "tools", "profile_step.py"), TINY, "--set", "model.num_layers=1",
           "model.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1",
           "--steps", "1", "--warmup", "1", "--host", "--sites", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    cats = {r["category"]: r for r in s["categories"]}
    assert list(cats) == ["communication", "optimizer", "cross-entropy", "attention/mixer", "GEMM",
                          "norms/elementwise", "host gaps"]
    for c in ("optimizer", "cross-entropy", "GEMM", "norms/elementwise"):
        assert cats[c]["ms_per_step"] > 0 and cats[c]["top"], c
    assert any(n == "aten::mm" for n, _ in cats["GEMM"]["top"])
    # operator calls per step and their mean length: every call of a category counted once
    for c in ("optimizer", "GEMM"):
        r = cats[c]
        assert r["count_per_step"] >= 1 and r["mean_us"] > 0
        assert abs(r["count_per_step"] * r["mean_us"] / 1e3 - r["ms_per_step"]) < 1e-6 * max(1.0, r["ms_per_step"])
    assert "op calls/step" in p.stdout
    assert s["machine"]["dispatch_us"] > 0 and "host: " in p.stdout
    # the most frequent items, most first, their calls adding up to the categories' counts
    freq = s["most_frequent"]
    assert freq and all(a[1] >= b[1] for a, b in zip(freq, freq[1:])) and "most frequent" in p.stdout
    assert sum(c for _, c, _ in freq) <= sum(r.get("count_per_step", 0) for r in s["categories"])
    assert all(c >= 1 for _, c, _ in freq) and sum(ms for _, _, ms in freq) <= s["busy_ms_per_step"] * 1.001
    assert any(n.startswith("Optimizer.step#") for n, _ in cats["optimizer"]["top"])
    total = sum(r["percent"] for r in s["categories"])
    assert 99.0 < total < 101.0, total  # CPU: one thread of operators + the time outside them
    assert "% of step" in p.stdout and "host gaps" in p.stdout
    # the same step without the profiler, against the time in operators under it
    assert s["unprofiled_step_ms"] > 0 and "step (unprofiled)" in p.stdout
    # --host: one more step under cProfile, its Python functions by own time, most first
    fns = s["host"]["functions"]
    assert s["host"]["host_ms"] > 0 and len(fns) == 25 and "host functions of one more step" in p.stdout
    assert all(a[1] >= b[1] for a, b in zip(fns, fns[1:])) and all(calls >= 1 for _, _, calls in fns)
    assert sum(ms for _, ms, _ in fns) <= s["host"]["host_ms"] * 1.01
    # --sites: one more step's launches (CPU: leaf operator calls) by operator and call site, most
    # first; the sites are the project's own frames (the mixers' and layers' lines), not torch's
    ls = s["launch_sites"]
    assert len(ls) == 40 and all(a[3] >= b[3] for a, b in zip(ls, ls[1:])) and "by operator and call site" in p.stdout
    assert all(n >= 1 and ms >= 0 and op == kernel for op, kernel, _, n, ms in ls)  # CPU: the operator itself
    assert any(op.startswith("aten::") and "megatron_ham/" in site for op, _, site, _, _ in ls), ls[:5]
    assert not any("/torch/" in site for _, _, site, _, _ in ls)
    bad = subprocess.run(cmd[:2] + ["no/such.yaml"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "no/such.yaml" in bad.stderr


def _profile_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", os.path.join(REPO, "tools", "profile_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, parents, cat", [
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT", ["aten::mm", "aten::matmul", "LinearWithGradAccumulation"], "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", ["aten::addmm"], "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", ["aten::_scaled_dot_product_cudnn_attention"],
     "attention/mixer"),
    ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", ["cuLaunchKernel", "ChunkGatedDeltaRuleFunction"], "attention/mixer"),
    ("_fwd_kernel", ["cuLaunchKernelEx", "_StaircaseAttention"], "attention/mixer"),
    ("_staircase_dkdv_kernel", ["cuLaunchKernelEx"], "attention/mixer"),  # by its own name
    ("_rms_norm_bwd_kernel", ["cuLaunchKernelEx", "_RMSNormWithResidual"], "norms/elementwise"),
    ("main_kernel", ["cuLaunchKernel", "_GDNWithError"], "attention/mixer"),  # a TileLang kernel
    ("triton_red_fused_exp_log_max_sub_sum_0", ["Torch-Compiled Region: 2/0", "_VocabParallelCrossEntropy"],
     "cross-entropy"),
    ("triton_poi_fused_mul_silu_0", ["Torch-Compiled Region: 1/0", "CompiledFunction"], "norms/elementwise"),
    ("multi_tensor_apply_kernel", ["aten::_foreach_mul_", "Optimizer.step#Adam.step"], "optimizer"),
    ("void at::native::vectorized_elementwise_kernel", ["aten::copy_", "Optimizer.step#Adam.step"], "optimizer"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", ["c10d::reduce_scatter_tensor_coalesced_"], "communication"),
    ("Memcpy DtoD (Device -> Device)", ["aten::copy_"], "norms/elementwise"),
])
def test_profile_categories(name, parents, cat):
    assert _profile_tool().classify(name, parents) == cat


def test_profile_busy_union():
    union = _profile_tool()._union_us
    assert union([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # overlaps counted once
    assert union([]) == 0


@pytest.mark.parametrize("name, parents", [
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", ["ScaledDotProductFlashAttentionBackward0"]),
    ("triton_poi_fused_0", ["FlexAttentionBackward"]),
    ("void at::native::elementwise_kernel", ["aten::mul", "_StaircaseAttentionBackward"]),
])
def test_profile_categories_backward(name, parents):
    assert _profile_tool().classify(name, parents) == "attention/mixer"


@pytest.mark.parametrize("linked", [True, False])
def test_profile_device_items_find_the_launching_operator(linked):
    """Kernels are attributed to the operator that launched them, through the correlation link
    (torch >= 2.12) or, where events lack it (torch 2.11 on the GPU machine), through the CPU
    events' kernel lists; device time no CPU event claims stays visible as "(unattributed)"."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    op = FunctionEvent(7, "_StaircaseAttentionBackward", 1, 0, 100)
    launch = FunctionEvent(8, "cudaLaunchKernel", 1, 10, 12)
    launch.set_cpu_parent(op)
    kern = FunctionEvent(9, "triton_poi_fused_0", 1, 20, 50, device_type=DeviceType.CUDA,
                         linked_correlation_id=8)
    stray = FunctionEvent(10, "Memset (Device)", 1, 60, 65, device_type=DeviceType.CUDA)
    launch.append_kernel(kern.name, 0, 30)
    if not linked:
        for e in (op, launch, kern, stray):
            del e.linked_correlation_id
    tool = _profile_tool()
    items = tool._device_items([op, launch, kern, stray], [kern, stray])
    named = {name: (us, parents) for name, us, parents in items}
    assert named["triton_poi_fused_0"] == (30, ["cudaLaunchKernel", "_StaircaseAttentionBackward"])
    assert tool.classify("triton_poi_fused_0", named["triton_poi_fused_0"][1]) == "attention/mixer"
    stray_name = "Memset (Device)" if linked else "(unattributed)"
    assert named[stray_name][0] == 5


def test_profile_idle_attribution():
    """GPU idle [10, 20) and [30, 40): the host ran op B (inside root A) over [12, 18), A alone
    over [10, 12) and [18, 20), then nothing until 35, then C over [35, 50)."""
    tool = _profile_tool()
    idle = tool._idle_intervals([(0, 10), (20, 30), (40, 60)], 0, 60)
    assert idle == [(10, 20), (30, 40)]
    assert tool._idle_intervals([(5, 10)], 0, 8) == [(0, 5)]

    class Ev:
        def __init__(self, name, a, b, parent=None):
            from types import SimpleNamespace

            self.name, self.time_range, self.cpu_parent, self.cpu_children = name, SimpleNamespace(start=a, end=b), parent, []
            if parent is not None:
                parent.cpu_children.append(self)

    a = Ev("A", 8, 20)
    b = Ev("B", 12, 18, a)
    c = Ev("C", 35, 50)
    g = tool.idle_activity([a, b, c], idle)
    assert dict(map(tuple, g["ops"])) == {"A": 4, "B": 6, "C": 5}
    assert dict(map(tuple, g["roots"])) == {"A": 10, "C": 5}
    assert g["no_operator"] == 5 and g["intervals"] == 2 and g["over_1ms"] == 0


@pytest.mark.gpu
def test_profile_counts_synchronizing_calls():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the GPU machine)")
    x = torch.arange(10, device="cuda")

    def waits():
        (x > 4).nonzero()            # waits for the GPU: its output size is data-dependent
        x.sum().item()               # and so does .item()

    def runs_ahead():
        torch.cumsum(x, 0)           # no wait

    tool = _profile_tool()
    got, base = tool.synchronizing_calls(waits), tool.synchronizing_calls(runs_ahead)
    # each waiting call is counted (2026-12-02, H200: 3, the .item() copy and its wait apart)
    assert got["total"] - base["total"] >= 2, (got, base)
    assert any("test_throughput_tools.py" in site for site, _ in got["sites"]), got


def test_sweep_staircase_plan_and_cpu_refusal():
    """tools/sweep_staircase.py varies one kernel at a time (every candidate of each kernel once
    per layout, the others at their first candidate) and says plainly that it needs a GPU."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import sweep_staircase as sw
    finally:
        sys.path.pop(0)
    jobs = sw.jobs(["compact", "gather"])
    for layout in ("compact", "gather"):
        mine = [j for j in jobs if j["layout"] == layout]
        for kern, cands in (("fwd", sw.FWD), ("dq", sw.DQ), ("dkdv", sw.DKDV)):
            assert sorted({j["tiles"][kern] for j in mine}) == sorted(cands)
        base = {"fwd": sw.FWD[0], "dq": sw.DQ[0], "dkdv": sw.DKDV[0]}
        for j in mine:  # only the kernel it names differs from the base
            assert all(j["tiles"][k] == base[k] for k in base if k != j["kernel"])
    # --groups jobs fix the schedule's heads per group next to (JSON-listed) tiles
    assert sw._tiles({"tiles": {"fwd": [64, 64, 4, 3], "group": 2}}) == {"fwd": (64, 64, 4, 3),
                                                                         "group": 2}
    if not __import__("torch").cuda.is_available():
        r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "sweep_staircase.py"),
                            "--compile-workers", "0"], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
        assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr


@pytest.mark.parametrize("name,row", [("bench_short_conv.py", "conv_fla_pre"), ("bench_norm_mlp.py", "prenorm_ours"),
                                      ("bench_sdpa_host.py", "waits")])
def test_gpu_benches_refuse_cpu(name, row):
    """The GPU-only benches explain themselves (their rows in --help) and say plainly that they
    need a GPU."""
    tool = os.path.join(REPO, "tools", name)
    r = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0 and row in r.stdout
    if not __import__("torch").cuda.is_available():
        r = subprocess.run([sys.executable, tool], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
        assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr


def test_gpu_checks_smoke_config_loads(tmp_path):
    """The training config tools/gpu_checks.sh runs on the device (its C="..." line, both runs'
    step counts) passes the recipe checks here, so a broken override fails on CPU, not after
    minutes of device time (its 2026-12-03 06:26 run stopped at data.loss_mask)."""
    import re
    import shlex

    text = open(os.path.join(REPO, "tools", "gpu_checks.sh")).read()
    m = re.search(r'^C="([^"]*)"', text, re.M)
    assert m, "tools/gpu_checks.sh: no C=\"...\" config line"
    recipe, *overrides = shlex.split(m.group(1).replace("$W", str(tmp_path)))
    steps = re.findall(r"megatron_ham\.train \$C (train\.train_steps=\d+)", text)
    assert len(steps) == 2, steps
    for s in steps:
        cfg = load_config(os.path.join(REPO, recipe), overrides + [s])
        assert cfg.data.backend == "synthetic" and cfg.checkpoint.dir == f"{tmp_path}/ckpt"


@pytest.mark.parametrize("stacks_on_ops", [True, False])
def test_profile_launch_sites(stacks_on_ops):
    """Each kernel is counted under the outermost operator above its runtime call and the
    innermost Python frames outside torch: from Python events in the parent chain (torch 2.13)
    or from a stack recorded on the operator itself (FunctionEvent.stack, where a profiler fills it)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    site = "megatron_ham/layers/ham_mixer.py(107): _random_scores"
    frames = [site, "torch/nn/modules/module.py(1775): _call_impl", "megatron_ham/layers/ham_mixer.py(160): forward"]
    caller = FunctionEvent(1, frames[2], 1, 0, 100)
    wrapper = FunctionEvent(2, frames[1], 1, 1, 99)
    fn = FunctionEvent(3, frames[0], 1, 2, 98)
    zeros = FunctionEvent(4, "aten::zeros", 1, 3, 90, stack=frames if stacks_on_ops else [])
    fill = FunctionEvent(5, "aten::fill_", 1, 4, 80)
    launch = FunctionEvent(6, "cudaLaunchKernel", 1, 5, 6)
    chain = [caller, wrapper, fn, zeros, fill, launch] if not stacks_on_ops else [zeros, fill, launch]
    for parent, child in zip(chain, chain[1:]):
        child.set_cpu_parent(parent)
    kernels = []
    for i in range(3):
        k = FunctionEvent(10 + i, "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                          "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>)", 1, 20 + 10 * i, 22 + 10 * i,
                          device_type=DeviceType.CUDA, linked_correlation_id=6)
        launch.append_kernel(k.name, 0, 2)
        kernels.append(k)
    tool = _profile_tool()
    rows = tool.launch_sites(chain + kernels, steps=3)
    want_site = f"{site} <- megatron_ham/layers/ham_mixer.py(160): forward"
    assert rows == [["aten::zeros", "elementwise FillFunctor<float>", want_site, 1.0, pytest.approx(0.002)]]
    assert tool._short_kernel("Memset (Device)") == "Memset (Device)"


def test_profile_table_unprofiled_lines():
    """The unprofiled line says how long the GPU idled in the profiled steps, and the next line
    gives the GPU-busy time per sequence with the caveat that few sequences per step count the
    step's once-per-step work as idle (2026-12-04: 23 % idle at a global batch of 2, under 1 % in
    the recipe on the same machine); a CPU timeline has no idle time and no per-sequence line."""
    tool = _profile_tool()
    s = {"timeline": "cuda", "global_batch_size": 4, "step_wall_ms": 1500.0, "busy_ms_per_step": 1000.0,
         "unprofiled_step_ms": 1300.0, "categories": [
             {"category": "GEMM", "ms_per_step": 1000.0, "percent": 66.7, "top": [["nvjet", 1000.0]]}]}
    lines = {l[:20].strip(): l[20:] for l in tool.format_table(s).splitlines()}
    assert "the GPU idles about 300.00 ms/step, 23.1%" in lines["step (unprofiled)"]
    per_seq = lines["GPU busy/sequence"]
    assert per_seq.split()[0] == "250.00" and "global batch of 4" in per_seq and "--mode recipe" in per_seq
    s.update(timeline="cpu")
    lines = {l[:20].strip(): l[20:] for l in tool.format_table(s).splitlines()}
    assert "idles" not in lines["step (unprofiled)"] and "GPU busy/sequence" not in lines
