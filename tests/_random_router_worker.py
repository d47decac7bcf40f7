"""Worker of tests/test_random_router.py (a fresh process: Megatron's global state).

    python tests/_random_router_worker.py OUT_DIR

A tiny HAM with router=random: 40 training-mode forwards + controller updates, eval-mode routing
on two different inputs, a checkpoint in the trainer's layout, ham-convert-hf's convert() (which
verifies HF logits against Megatron's) and greedy generation with and without the cache.
Then a learned router with router_score "logit" (the controller in linear space): its scores
are the router's logits, the controller holds the target, and it exports with verified logits.
Writes OUT_DIR/result.json.
"""
import json
import os
import sys
import warnings


def _save_run(run: str, model, cfg, step: int) -> str:
    """`model` saved as ham-train lays out a run (step dir, config.yaml, train_state, latest)."""
    import yaml
    from megatron.core import dist_checkpointing

    d = os.path.join(run, f"step_{step:08d}")
    os.makedirs(d)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, d)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump({"name": os.path.basename(run), "model": cfg.to_dict(),
                        "data": {"backend": "synthetic", "eod_id": 0, "documents": True, "tokenizer": None}}, f)
    with open(os.path.join(d, "train_state.json"), "w") as f:
        json.dump({"step": step, "consumed_samples": 4 * step, "world_size": 1}, f)
    with open(os.path.join(run, "latest"), "w") as f:
        f.write(f"step_{step:08d}\n")
    return run


def main(root: str) -> None:
    warnings.filterwarnings("ignore")
    import torch

    from megatron_ham.hf.convert import _init_single_process, convert
    from megatron_ham.models import ModelConfig, build_model, step_kv_controllers

    torch.set_num_threads(1)
    _init_single_process()
    cfg = ModelConfig(architecture="ham", num_layers=2, hidden_size=32, vocab_size=100, mixer_num_heads=2,
                      mixer_key_head_dim=8, mixer_value_head_dim=16, router="random", router_seed=5,
                      kv_fraction=0.25, dtype="fp32", use_cpu_initialization=True, seq_length=64)
    torch.manual_seed(1)
    model = build_model(cfg)
    mixers = [layer.self_attention for layer in model.decoder.layers]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, 100, (4, 64), generator=g)
    model.train()
    fractions, train_routed = [], []
    for _ in range(40):
        model(x, None, None)
        train_routed.append(mixers[0].last_routed.clone())
        kv = step_kv_controllers(model)
        fractions.append([kv[i]["fraction"] for i in sorted(kv)])
    model.eval()
    with torch.no_grad():
        model(x, None, None)
        eval_a = [m.last_routed.clone() for m in mixers]
        model(torch.randint(1, 100, (4, 64), generator=g), None, None)
        eval_b = [m.last_routed.clone() for m in mixers]
    run = _save_run(os.path.join(root, "run"), model, cfg, 40)
    convert(run, os.path.join(root, "hf"), verify_tokens=48)  # raises if HF logits differ
    from megatron_ham.hf import HAMForCausalLM

    hf = HAMForCausalLM.from_pretrained(os.path.join(root, "hf")).eval()
    ids = torch.randint(1, 100, (1, 12), generator=g)
    with_cache = hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    without = hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    with torch.no_grad():
        hf(x[:1], use_cache=False)
    hf_routed = hf.model.layers[0].mixer.last_routed[0]
    # the learned router thresholding its logit
    lcfg = ModelConfig(**dict(cfg.to_dict(), router="learned", router_score="logit"))
    torch.manual_seed(1)
    lmodel = build_model(lcfg)
    lmixers = [layer.self_attention for layer in lmodel.decoder.layers]
    lmodel.train()
    logit_fractions = []
    for _ in range(20):
        lmodel(x, None, None)
        kv = step_kv_controllers(lmodel)
        logit_fractions.append([kv[i]["fraction"] for i in sorted(kv)])
    lmodel.eval()
    with torch.no_grad():
        lmodel(x, None, None)
        xh = lmodel.embedding(x, None).detach()  # layer 0's input is norm(embedding)
        z = lmixers[0].router.logits(lmodel.decoder.layers[0].input_layernorm(xh)).transpose(0, 1)
    bmodel = build_model(ModelConfig(**dict(lcfg.to_dict(), dtype="bf16")))
    bf16_dtypes = sorted({str(p.dtype) for p in bmodel.parameters()})
    bz = bmodel.decoder.layers[0].self_attention.router.logits(torch.randn(3, 32, dtype=torch.bfloat16))
    lrun = _save_run(os.path.join(root, "learned"), lmodel, lcfg, 20)
    convert(lrun, os.path.join(root, "learned_hf"), verify_tokens=48)
    result = {
        "fractions": fractions,
        "taus": [float(m.kv_controller.tau) for m in mixers],
        "eval_content_independent": all(bool((a == b).all()) for a, b in zip(eval_a, eval_b)),
        "eval_rows_equal": bool((eval_a[0] == eval_a[0][0:1]).all()),
        "eval_layers_differ": bool((eval_a[0] != eval_a[1]).any()),
        "eval_fraction": float(eval_a[0].float().mean()),
        "train_steps_differ": bool((train_routed[-1] != train_routed[-2]).any()),
        "train_rows_differ": bool((train_routed[-1][0] != train_routed[-1][1]).any()),
        "hf_router": [hf.config.router, hf.config.router_seed],
        "hf_equals_megatron_routing": bool((hf_routed == eval_a[0][0]).all()),
        "cache_equals_no_cache": bool((with_cache == without).all()),
        "logit_fractions": logit_fractions,
        "logit_space": lmixers[0].kv_controller.space,
        "logit_scores_are_logits": float((lmixers[0].last_scores - z).abs().max()),
        "logit_scores_negative": bool((lmixers[0].last_scores < 0).any()),
        "bf16_param_dtypes": bf16_dtypes, "bf16_router_logit_dtype": str(bz.dtype),
        "learned_hf_router_score": json.load(open(os.path.join(root, "learned_hf", "config.json")))["router_score"],
    }
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
