"""Worker of tests/test_output_gate.py (a fresh process: Megatron's global state).

    python tests/_output_gate_worker.py OUT_DIR

A tiny "HG" model (a HAM and a GDN layer) with model.output_gate "none": its in_proj sections,
a forward, a checkpoint in the trainer's layout and ham-convert-hf's convert() (which verifies
the HF logits against Megatron's). Writes OUT_DIR/result.json.
"""
import json
import os
import sys
import warnings

from _random_router_worker import _save_run


def main(root: str) -> None:
    warnings.filterwarnings("ignore")
    import torch

    from megatron_ham.hf.convert import _init_single_process, convert
    from megatron_ham.models import ModelConfig, build_model

    torch.set_num_threads(1)
    _init_single_process()
    result = {}
    for gate in ("silu", "none"):
        cfg = ModelConfig(architecture="hybrid", pattern="HG", num_layers=2, hidden_size=32, vocab_size=100,
                          mixer_num_heads=2, mixer_key_head_dim=8, mixer_value_head_dim=16,
                          kv_fraction=0.5, output_gate=gate, dtype="fp32", use_cpu_initialization=True,
                          seq_length=64)
        torch.manual_seed(1)
        model = build_model(cfg)
        mixers = [layer.self_attention for layer in model.decoder.layers]
        x = torch.randint(1, 100, (2, 64), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = model(x, None, None)
        run = _save_run(os.path.join(root, f"run_{gate}"), model, cfg, 1)
        convert(run, os.path.join(root, f"hf_{gate}"), verify_tokens=48)  # raises if HF logits differ
        hf_cfg = json.load(open(os.path.join(root, f"hf_{gate}", "config.json")))
        from megatron_ham.hf import HAMForCausalLM

        hf = HAMForCausalLM.from_pretrained(os.path.join(root, f"hf_{gate}"))
        result[gate] = {
            "sections": [m.section_names("in_proj.weight") for m in mixers],
            "in_proj_rows": [int(m.in_proj.weight.shape[0]) for m in mixers],
            "finite": bool(torch.isfinite(logits).all()),
            "hf_output_gate": hf_cfg["output_gate"],
            "hf_has_z_proj": [hasattr(layer.mixer, "z_proj") for layer in hf.model.layers],
        }
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
