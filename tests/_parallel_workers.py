"""Workers of the parallel tests (no pytest import: tools/gpu_parallel_check.py runs them on
GPUs too). Each runs in a spawned world (tests/_dist.py) and raises AssertionError naming what
differs."""
from __future__ import annotations

import os

import torch


ATOL, RTOL = 2e-5, 1e-4


def _close(name, a, b, atol=ATOL, rtol=RTOL):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {list(a.shape)} != {list(b.shape)}")
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{name}: max abs diff {err:.3e} (scale {b.abs().max().item():.3e})")


def _same_on_all_ranks(name, t, group=None):
    import torch.distributed as dist

    t = t.detach().contiguous()
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(outs, t, group=group)
    for i, o in enumerate(outs):
        if not torch.equal(o, outs[0]):
            raise AssertionError(f"{name}: differs between ranks 0 and {i}")


# ---------------------------------------------------------------------------- mixer (TP, SP)
def _gdn_mixer_kernels_worker(rank, world):
    """One CUDA process: the GDN and HAM mixers in bf16 on their GPU kernels (model impl "auto":
    fla's conv, our q/k/v activation kernels, fla's GDN, HAM's staircase) are as close to
    the fp32 mixer as the same bf16 mixer on the reference ops (impl "chunk"): forward and
    backward, on a batch of 2 rows with documents (the conv's flattened-batch path, the
    projection transposed from [s, b]). Wrong wiring (documents, strides, the in-projection's
    gradient) would be far off. HAM routes with the random router (content-independent, so
    both runs route the same tokens). The allowance (1.5x the reference ops' distance, at least
    3e-2) is for the per-head gate parameters, whose gradients sum a bf16 product over every
    token: on the H200 on 2026-12-03 06:57, A_log.grad was 2.32e-2 from fp32 on the kernels and
    1.84e-2 on the reference ops (out and x.grad: the kernels closer). Every tensor is printed
    before the verdict."""
    from megatron_ham import distributed as D
    from megatron_ham.models import document_forward_kwargs
    from megatron_ham.ops.short_conv import conv_impl

    D.initialize(tp=1, seed=11, backend="nccl")
    dev = torch.device("cuda", torch.cuda.current_device())
    s, b, h = 512, 2, 256
    g = torch.Generator().manual_seed(5)
    x_full, dout_full = torch.randn(s, b, h, generator=g), torch.randn(s, b, h, generator=g)
    tokens = torch.randint(1, 50, (b, s), generator=g)
    tokens[0, 100] = tokens[1, 7] = tokens[1, 300] = 0
    docs = document_forward_kwargs(tokens, 0, dev)  # boundaries on the GPU, their host copy kept
    dims = dict(hidden_size=h, mixer_num_heads=2, mixer_key_head_dim=64, mixer_value_head_dim=64,
                fusions="off")
    assert conv_impl(torch.zeros(1, 1, 1, device=dev, dtype=torch.bfloat16)) == "fla"
    bad = []
    for kind, router in (("gdn", "error_l2"), ("ham", "random")):
        m = _build_mixer(kind, router, False, dev, dtype="bf16", **dims)
        m32 = _build_mixer(kind, router, False, dev, dtype="fp32", **dims)
        with torch.no_grad():  # the fp32 mixer holds the bf16 mixer's (rounded) weights
            for p32, p in zip(m32.parameters(), m.parameters()):
                p32.copy_(p.float())

        def run(mixer, impl, dtype):
            mixer.impl = impl
            if kind == "ham":  # its scratchpad: the staircase kernel, or the reference
                mixer.scratchpad_impl = "auto" if impl == "auto" else "reference"
            out, xg = _mixer_case(mixer, x_full.to(dtype), dout_full.to(dtype), False, 1, 0, dev, docs)
            return [t.float() for t in [out, xg] + [p.grad for p in mixer.parameters()]]

        exact = run(m32, "chunk", torch.float32)
        names = ["out", "x.grad"] + [f"{n}.grad" for n, _ in m.named_parameters()]
        errs = {}
        for impl in ("auto", "chunk"):
            errs[impl] = [((a - e).norm() / e.norm().clamp_min(1e-12)).item()
                          for a, e in zip(run(m, impl, torch.bfloat16), exact)]
        for name, ek, er in zip(names, errs["auto"], errs["chunk"]):
            print(f"[{kind} mixer] {name}: rel. diff. from fp32: kernels {ek:.2e}, reference ops {er:.2e}")
            if ek > max(3e-2, 1.5 * er):
                bad.append(f"{kind} {name}: bf16 kernels {ek:.3e} from fp32, the bf16 reference ops {er:.3e}")
    assert not bad, "mixers on the GPU kernels: " + "; ".join(bad)


def _pre_norm_swiglu_worker(rank, world):
    """One CUDA process: a bf16 two-layer attention model with the fusions on (its pre-norms
    return the residual branch, on our RMSNorm kernels inside megatron-core's TransformerLayer;
    its SwiGLU is liger-kernel's through the MLP's activation module) gives the loss and every
    gradient of the same model with the fusions off (torch's norm, megatron's SwiGLU), to bf16
    rounding."""
    from megatron_ham import distributed as D
    from megatron_ham.layers.swiglu import SwiGLU

    D.initialize(tp=1, seed=3, backend="nccl")
    dev = torch.device("cuda", torch.cuda.current_device())
    bt = _batch(dev)
    res = {}
    for fusions in ("off", "on"):
        cfg = _model_cfg(architecture="hybrid", pattern="**", num_layers=2, dtype="bf16", fusions=fusions,
                         use_cpu_initialization=True)
        m = _new_model(cfg, 0, dev)
        layers = m.decoder.layers
        kinds = [(getattr(layers[0].input_layernorm, "has_residual", None),
                  isinstance(layers[0].mlp.activation_func, SwiGLU))]
        if kinds != [(fusions == "on", fusions == "on")]:
            raise AssertionError(f"fusions {fusions}: (has_residual, SwiGLU module) = {kinds}")
        loss = _per_token_loss(m, bt).float().mean()
        loss.backward()
        res[fusions] = [loss.detach()] + [p.grad.float() for p in m.parameters()]
    names = ["loss"] + [n for n, _ in m.named_parameters()]
    errs = {n: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
            for n, a, b in zip(names, res["on"], res["off"])}
    print("fusions on vs off, ||on - off|| / ||off||:", {n: f"{e:.1e}" for n, e in errs.items()})
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    if bad:
        raise AssertionError(f"fusions on differ from off: {bad}")


def _build_mixer(kind, router, sp, device, seed=7, **overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ham.layers import get_backend, get_kind
    from megatron_ham.models import ModelConfig
    from megatron_ham.models.builder import transformer_config

    settings = dict(architecture="ham", hidden_size=32, mixer_num_heads=4, mixer_key_head_dim=8,
                    mixer_value_head_dim=8, router=router.split("+")[0], dtype="fp32",
                    router_input="hidden+error" if router.endswith("+error") else "hidden",
                    use_cpu_initialization=True, sequence_parallel=sp, impl="chunk")
    cfg = ModelConfig(**{**settings, **overrides})
    tc = transformer_config(cfg)
    torch.manual_seed(seed)
    spec = get_kind(kind).spec(get_backend("local"), cfg)
    m = build_module(spec, config=tc, layer_number=1,
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return m.to(device)


def _mixer_case(m, x_full, dout_full, sp, tp, rank, device, doc_kwargs):
    s = x_full.shape[0]
    if sp:
        lo, hi = rank * s // tp, (rank + 1) * s // tp
        x = x_full[lo:hi].clone().to(device).requires_grad_(True)
        dout = dout_full[lo:hi].to(device)
    else:
        x = x_full.clone().to(device).requires_grad_(True)
        dout = dout_full.to(device)
    m.zero_grad(set_to_none=True)
    out, bias = m(x, None, **doc_kwargs)
    assert bias is None
    (out * dout).sum().backward()
    return out, x.grad


def _expected_local(m, name, g_full, tp, rank):
    """Slice of the TP=1 gradient that rank `rank` of TP=`tp` holds for parameter `name`."""
    H_l = m.H // tp
    if name in m.fused:  # the kind's section table: section-major per rank
        parts, off = [], 0
        for w in (s.width for s in m.fused[name].sections):
            parts.append(g_full[off + rank * H_l * w: off + (rank + 1) * H_l * w])
            off += m.H * w
        return torch.cat(parts, 0)
    if name in ("A_log", "dt_bias"):
        return g_full[rank * H_l:(rank + 1) * H_l]
    if name == "out_proj.weight":
        return g_full[:, rank * H_l * m.V:(rank + 1) * H_l * m.V]
    return g_full  # replicated: norm_weight, router.*


def _mixer_worker(rank, world, device_kind):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ham import distributed as D
    from megatron_ham.models import document_forward_kwargs, step_kv_controllers

    backend = "nccl" if device_kind == "cuda" else "gloo"
    D.initialize(tp=1, seed=11, backend=backend)
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    s, b, h = 16, 2, 32
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(s, b, h, generator=g)
    dout_full = torch.randn(s, b, h, generator=g)
    tokens = torch.randint(1, 50, (b, s), generator=g)
    tokens[0, 4] = 0
    tokens[1, 9] = 0
    tokens[1, 12] = 0
    docs = {k: (v if not hasattr(v, "cu_seqlens_q") else v) for k, v in document_forward_kwargs(tokens, 0).items()}
    docs["packed_seq_params"].cu_seqlens_q = docs["packed_seq_params"].cu_seqlens_q.to(device)
    docs["packed_seq_params"].cu_seqlens_kv = docs["packed_seq_params"].cu_seqlens_kv.to(device)
    cases = [("ham", "error_l2", True), ("ham", "learned", False), ("ham", "learned+error", True),
             ("ham", "error_cosine", False), ("gdn", "error_l2", True)]
    ref = {}
    # TP = 1 references (every rank computes them; DP = 2 here)
    for kind, router, use_docs in cases:
        kw = docs if use_docs else {}
        m = _build_mixer(kind, router, False, device)
        tau = None
        if kind == "ham":
            m.train()
            _mixer_case(m, x_full, dout_full, False, 1, 0, device, kw)
            step_kv_controllers([m], dp_group=None)
            tau = float(m.kv_controller.tau)
        out, xg = _mixer_case(m, x_full, dout_full, False, 1, 0, device, kw)
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        routed = m.last_routed.clone() if kind == "ham" else None
        if routed is not None:  # routing is selective: neither nothing nor everything
            frac = routed.float().mean().item()
            assert 0.0 < frac < 1.0, f"{router}: routed fraction {frac}"
        ref[(kind, router)] = (tau, out.detach().clone(), xg.clone(), grads, routed)
        del m

    D.initialize(tp=2, seed=11, backend=backend)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    tpg = ps.get_tensor_model_parallel_group()
    assert tp == 2
    for sp in (False, True):
        for kind, router, use_docs in cases:
            kw = docs if use_docs else {}
            tag = f"[{kind}/{router} sp={sp} docs={use_docs}]"
            tau, out1, xg1, grads1, routed1 = ref[(kind, router)]
            m = _build_mixer(kind, router, sp, device)
            if kind == "ham":
                m.kv_controller.set_tau(tau)
            out, xg = _mixer_case(m, x_full, dout_full, sp, tp, r, device, kw)
            if sp:
                lo, hi = r * s // tp, (r + 1) * s // tp
                _close(f"{tag} output", out, out1[lo:hi])
                _close(f"{tag} input grad", xg, xg1[lo:hi])
            else:
                _close(f"{tag} output", out, out1)
                _close(f"{tag} input grad", xg, xg1)
            for n, p in m.named_parameters():
                _close(f"{tag} grad {n}", p.grad, _expected_local(m, n, grads1[n], tp, r))
                if n == "norm_weight" or n.startswith("router."):
                    _same_on_all_ranks(f"{tag} grad {n}", p.grad, tpg)
            if kind == "ham":
                _same_on_all_ranks(f"{tag} routed", m.last_routed.to(torch.uint8), tpg)
                assert torch.equal(m.last_routed.cpu(), routed1.cpu()), f"{tag} routed != TP=1"
            del m
    dist.barrier()


# ---------------------------------------------------------------------------- full model + ckpt

def _model_cfg(sp=False, **kw):
    from megatron_ham.models import ModelConfig

    base = dict(architecture="hybrid", pattern="H*GH", num_layers=4, hidden_size=32,
                num_attention_heads=4, mixer_num_heads=4, mixer_key_head_dim=8,
                mixer_value_head_dim=8, ffn_hidden_size=64, vocab_size=200,
                make_vocab_size_divisible_by=64, seq_length=16, router="learned", dtype="fp32",
                use_cpu_initialization=True, sequence_parallel=sp, impl="chunk")
    base.update(kw)
    return ModelConfig(**base)


def _batch(device):
    from megatron_ham.models import document_forward_kwargs

    g = torch.Generator().manual_seed(5)
    b, s = 2, 16
    tokens = torch.randint(1, 200, (b, s), generator=g)
    tokens[0, 6] = 0
    tokens[1, 10] = 0
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(s)[None].expand(b, s).contiguous()
    docs = document_forward_kwargs(tokens, 0)
    psp = docs["packed_seq_params"]
    psp.cu_seqlens_q, psp.cu_seqlens_kv = psp.cu_seqlens_q.to(device), psp.cu_seqlens_kv.to(device)
    return dict(tokens=tokens.to(device), labels=labels.to(device), pos=pos.to(device), docs=docs)


def _new_model(cfg, seed, device, **kw):
    from megatron_ham.models import build_model

    torch.manual_seed(seed)
    return build_model(cfg, **kw).to(device)


def _per_token_loss(model, bt):
    return model(bt["tokens"], bt["pos"], None, labels=bt["labels"], **bt["docs"])


def _full_logits(model, bt):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        lg = model(bt["tokens"], bt["pos"], None, **bt["docs"])  # [b, s, V/tp]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return lg
    parts = [torch.empty_like(lg) for _ in range(tp)]
    dist.all_gather(parts, lg.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _sync_sp_grads(model):
    """What finalize_model_grads does for SP-tagged (replicated, seq-sharded) parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1 or not model.config.sequence_parallel:
        return
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def _save(model, path):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    dist.barrier()


def _load(model, path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)


def _save_grads(model, path):
    keep = {n: p.data.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data.copy_(p.grad)
    _save(model, path)
    for n, p in model.named_parameters():
        p.data.copy_(keep[n])


def _model_worker(rank, world, device_kind, tmp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ham import distributed as D
    from megatron_ham.layers import HAMMixer
    from megatron_ham.models import step_kv_controllers

    backend = "nccl" if device_kind == "cuda" else "gloo"
    dev = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    bt = _batch(dev)

    # phase 1: TP=2 with sequence parallelism
    D.initialize(tp=2, seed=1, backend=backend)
    cfg = _model_cfg(sp=True)
    m = _new_model(cfg, 1, dev)
    m.train()
    _per_token_loss(m, bt).sum().backward()
    stats = step_kv_controllers([m], dp_group=ps.get_data_parallel_group())
    assert sorted(stats) == [1, 4], stats  # HAM layers are global layers 1 and 4
    for mx in m.modules():
        if isinstance(mx, HAMMixer):
            _same_on_all_ranks("tau", mx.kv_controller.tau)
    m.zero_grad(set_to_none=True)
    loss_a = _per_token_loss(m, bt)
    loss_a.sum().backward()
    _sync_sp_grads(m)
    for mx in m.modules():
        if isinstance(mx, HAMMixer):
            _same_on_all_ranks("routed", mx.last_routed.to(torch.uint8))
            for n, p in mx.named_parameters():
                if n == "norm_weight" or n.startswith("router."):
                    _same_on_all_ranks(f"model grad {n}", p.grad)
    m.eval()
    logits_a = _full_logits(m, bt)
    taus_a = [float(mx.kv_controller.tau) for mx in m.modules() if isinstance(mx, HAMMixer)]
    assert all(t > 0 for t in taus_a), taus_a  # moved from the initial 0 by the controller
    _save(m, f"{tmp}/a_tp2")
    _save_grads(m, f"{tmp}/a_tp2_grads")
    del m

    # phase 2: TP=1 (DP=2): load the TP=2 checkpoint -> identical logits, loss and gradients
    D.initialize(tp=1, seed=1, backend=backend)
    cfg1 = _model_cfg(sp=False)
    m = _new_model(cfg1, 99, dev)
    _load(m, f"{tmp}/a_tp2")
    taus = [float(mx.kv_controller.tau) for mx in m.modules() if isinstance(mx, HAMMixer)]
    assert taus == taus_a, (taus, taus_a)  # tau is in the checkpoint
    m.eval()
    _close("TP2->TP1 logits", _full_logits(m, bt), logits_a, atol=1e-4)
    m.train()
    loss = _per_token_loss(m, bt)
    _close("TP2->TP1 per-token loss", loss, loss_a, atol=1e-4)
    loss.sum().backward()
    gm = _new_model(cfg1, 98, dev)
    _load(gm, f"{tmp}/a_tp2_grads")
    gref = dict(gm.named_parameters())
    for n, p in m.named_parameters():
        _close(f"TP2(SP)->TP1 grad {n}", p.grad, gref[n], atol=1e-4)
    del m, gm
    # reverse: TP=1 checkpoint -> TP=2 (SP off)
    mb = _new_model(cfg1, 5, dev)
    mb.train()
    _per_token_loss(mb, bt).sum().backward()
    step_kv_controllers([mb], dp_group=ps.get_data_parallel_group())
    mb.eval()
    logits_b = _full_logits(mb, bt)
    _save(mb, f"{tmp}/b_tp1")
    del mb

    # phase 3: TP=2 without SP loads the TP=1 checkpoint
    D.initialize(tp=2, seed=1, backend=backend)
    m = _new_model(_model_cfg(sp=False), 77, dev)
    _load(m, f"{tmp}/b_tp1")
    m.eval()
    _close("TP1->TP2 logits", _full_logits(m, bt), logits_b, atol=1e-4)

    # the four architectures build and run forward + backward at TP=2 + SP
    from megatron_ham.models import ModelConfig

    for arch in ("transformer", "gdn", "gdn_gsa", "ham"):
        c = _model_cfg(sp=True, architecture=arch, pattern="", router="error_l2")
        mm = _new_model(c, 3, dev)
        mm.train()
        loss = _per_token_loss(mm, bt)
        assert torch.isfinite(loss).all(), arch
        loss.mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in mm.parameters()), arch
    dist.barrier()


# ---------------------------------------------------------------------------- pipeline

def _pp_worker(rank, world, tmp, device_kind="cpu"):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ham import distributed as D
    from megatron_ham.models import step_kv_controllers

    backend = "nccl" if device_kind == "cuda" else "gloo"
    dev = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    bt = _batch(dev)
    D.initialize(tp=1, pp=1, seed=1, backend=backend)
    cfg = _model_cfg()
    m = _new_model(cfg, 4, dev)
    m.train()
    _per_token_loss(m, bt).sum().backward()
    step_kv_controllers([m], dp_group=ps.get_data_parallel_group())
    m.eval()
    with torch.no_grad():
        ref = _per_token_loss(m, bt)
    _save(m, f"{tmp}/pp1")
    del m

    D.initialize(tp=1, pp=2, seed=1, backend=backend)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    m = _new_model(cfg, 9, dev, pre_process=first, post_process=last)
    numbers = [layer.layer_number for layer in m.decoder.layers]
    assert numbers == ([1, 2] if first else [3, 4]), numbers
    _load(m, f"{tmp}/pp1")
    m.eval()

    def step(data_iter, model):
        b = next(data_iter)
        out = model(b["tokens"], b["pos"], None, labels=b["labels"], **b["docs"])

        def loss_func(o):
            return o.sum(), {"tok": o.detach()}

        return out, loss_func

    fb = get_forward_backward_func()
    res = fb(forward_step_func=step, data_iterator=iter([bt]), model=[m], num_microbatches=1,
             seq_length=bt["tokens"].shape[1], micro_batch_size=bt["tokens"].shape[0],
             forward_only=True)
    if last:
        assert len(res) == 1
        _close("PP2 per-token loss", res[0]["tok"], ref, atol=1e-5)
    dist.barrier()


# ------------------------------------------------------------- gradient accumulation fusion
def _wgrad_fusion_worker(rank, world, device_kind):
    """One process. CUDA: with train.gradient_accumulation_fusion on, every Megatron linear layer
    of a bf16 HAM sums its weight gradient into DDP's fp32 main_grad inside the GEMM
    (training/wgrad_fusion.py); after two micro-batches main_grad equals the unfused path's
    (each micro-batch's bf16 weight gradient added by DDP's hook) to bf16 rounding, for every
    parameter, the linear layers' and the others'. CPU: "auto" fuses nothing (there is no such
    GEMM on the CPU) and "on" is refused, naming the key."""
    from megatron.core import tensor_parallel

    from megatron_ham import distributed as D
    from megatron_ham.training.config import ConfigError, load_config
    from megatron_ham.training.loop import build_model_chunks

    cuda = device_kind == "cuda"
    D.initialize(tp=1, seed=3, backend="nccl" if cuda else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny_cpu.yaml")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, 8000, (2, 129), generator=g) for _ in range(2)]
    modes = ("off", "on") if cuda else ("off", "auto")
    grads, fused = {}, {}
    for mode in modes:
        cfg = load_config(recipe, ["model.dtype=" + ("bf16" if cuda else "fp32"), "model.fusions=off",
                                   "model.impl=chunk", "model.scratchpad_impl=reference",
                                   f"train.gradient_accumulation_fusion={mode}"])
        torch.manual_seed(0)
        if cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        else:
            cfg.model.use_cpu_initialization = True
        (chunk,) = build_model_chunks(cfg)
        fused[mode] = sum(bool(getattr(m, "gradient_accumulation_fusion", False)) for m in chunk.modules())
        chunk.zero_grad_buffer()
        with chunk.no_sync():
            for tokens in batches:
                tokens = tokens.to(dev)
                pos = torch.arange(128, device=dev).expand(2, 128)
                loss = chunk(tokens[:, :-1].contiguous(), pos, None, labels=tokens[:, 1:].contiguous())
                loss.float().mean().backward()
        grads[mode] = {n: p.main_grad.detach().float().clone() for n, p in chunk.module.named_parameters()}
    if not cuda:
        if fused["auto"] != 0:
            raise AssertionError(f"{fused['auto']} linear layers fused on the CPU")
        cfg.train.gradient_accumulation_fusion = "on"
        try:
            build_model_chunks(cfg)
        except ConfigError as e:
            if "train.gradient_accumulation_fusion" not in str(e):
                raise AssertionError(f"the refusal does not name the key: {e}") from e
        else:
            raise AssertionError("gradient_accumulation_fusion=on was accepted on the CPU")
    elif fused["off"] != 0 or fused["on"] < 5:
        raise AssertionError(f"fused linear layers: off {fused['off']}, on {fused['on']}")
    a_mode, b_mode = modes[1], modes[0]
    if grads[a_mode].keys() != grads[b_mode].keys():
        raise AssertionError("different parameters with and without the fusion")
    worst = {}
    for n, a in grads[a_mode].items():
        b = grads[b_mode][n]
        if b.abs().max() == 0:
            raise AssertionError(f"{n}: zero gradient without the fusion")
        worst[n] = ((a - b).norm() / b.norm()).item()
    print(f"wgrad fusion {a_mode} vs {b_mode}, ||a - b|| / ||b|| per parameter:",
          {n: f"{e:.1e}" for n, e in worst.items()})
    bad = {n: e for n, e in worst.items() if not e < (1e-2 if cuda else 1e-6)}
    if bad:
        raise AssertionError(f"main_grad differs with the fusion: {bad}")


def _swiglu_module_worker(rank, world):
    """One CPU process: megatron-core's MLP built from our spec with the SwiGLU module (what a
    CUDA model with liger-kernel runs, forced here: layers.swiglu.swiglu_available patched) gives
    the output, input and weight gradients of megatron's own SwiGLU path, and the same state
    dict keys (the module has no parameters: checkpoints do not change); not with the model
    setting norm_mlp_kernels false."""
    from megatron.core.transformer.spec_utils import build_module

    import megatron_ham.layers.swiglu as S
    from megatron_ham import distributed as D
    from megatron_ham.layers import get_backend
    from megatron_ham.layers.specs import mlp_spec
    from megatron_ham.models.builder import transformer_config

    D.initialize(tp=1, seed=1, backend="gloo")
    cfg = _model_cfg(fusions="on")
    x0 = torch.randn(6, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    res = []
    for available in (False, True):
        S.swiglu_available = lambda: available  # noqa: E731  (the test's stand-in for CUDA + liger)
        tc = transformer_config(cfg)
        tc.bias_activation_fusion = False  # megatron's compiled SwiGLU needs a C++ compiler on the CPU
        if tc.use_te_activation_func != available:
            raise AssertionError(f"use_te_activation_func {tc.use_te_activation_func} with liger {available}")
        torch.manual_seed(0)
        mlp = build_module(mlp_spec(get_backend("local"), cfg), config=tc)
        if isinstance(mlp.activation_func, S.SwiGLU) != available:
            raise AssertionError(f"activation {mlp.activation_func} with liger {available}")
        x = x0.clone().requires_grad_(True)
        out, _ = mlp(x)
        out.pow(2).sum().backward()
        res.append((sorted(mlp.state_dict()), [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]))
    if S.fused_swiglu(_model_cfg(fusions="on", norm_mlp_kernels=False)):
        raise AssertionError("model.norm_mlp_kernels=false still picks the SwiGLU module")
    if res[0][0] != res[1][0]:
        raise AssertionError(f"state dict keys differ: {res[0][0]} vs {res[1][0]}")
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b)
