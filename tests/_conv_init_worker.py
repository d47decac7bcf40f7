"""Worker of tests/test_conv_init.py (a fresh process: Megatron's global state).

    python tests/_conv_init_worker.py OUT_DIR

A tiny "HG" model (a HAM and a GDN layer) built with model.conv_init "uniform" and "shift" from
the same seed: the conv taps, whether every other parameter is the same, a finite forward.
Writes OUT_DIR/result.json.
"""
import json
import os
import sys
import warnings


def main(root: str) -> None:
    warnings.filterwarnings("ignore")
    import torch

    from megatron_ham.hf.convert import _init_single_process
    from megatron_ham.models import ModelConfig, build_model

    torch.set_num_threads(1)
    _init_single_process()
    params, result = {}, {}
    for init in ("uniform", "shift"):
        cfg = ModelConfig(architecture="hybrid", pattern="HG", num_layers=2, hidden_size=32, vocab_size=100,
                          mixer_num_heads=2, mixer_key_head_dim=8, mixer_value_head_dim=16, conv_kernel=4,
                          kv_fraction=0.5, conv_init=init, dtype="fp32", use_cpu_initialization=True,
                          seq_length=64)
        torch.manual_seed(1)
        model = build_model(cfg)
        params[init] = {n: p.detach().clone() for n, p in model.named_parameters()}
        x = torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = model(x, None, None)
        mixers = [layer.self_attention for layer in model.decoder.layers]
        result[init] = {"conv": [m.conv1d.weight[:, 0, :].tolist() for m in mixers],
                        "widths": [m.local_widths("conv1d.weight") for m in mixers],
                        "names": [m.section_names("conv1d.weight") for m in mixers],
                        "finite": bool(torch.isfinite(logits).all())}
    result["other_params_equal"] = all(torch.equal(params["uniform"][n], params["shift"][n])
                                       for n in params["uniform"] if "conv1d" not in n)
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
