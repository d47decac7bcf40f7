"""Layer pattern -> per-layer specs -> Megatron GPTModel; the paper's four architectures.

Public API (stable; used by megatron_ham.training):
    ModelConfig                                   typed model settings (recipe YAML maps 1:1)
    build_model(cfg, *, pre_process, post_process, vp_stage=None) -> GPTModel
    step_kv_controllers(model_chunks, dp_group) -> {layer: {"fraction", "tau"}}   (after each step)
    document_forward_kwargs(tokens [b, s], eod_id) -> dict of extra model-forward kwargs
    presets: paper_800m(architecture) -> ModelConfig
"""
from .builder import build_model, document_forward_kwargs, step_kv_controllers, transformer_config
from .config import ARCHITECTURES, ModelConfig
from .presets import paper_800m

__all__ = [
    "build_model", "step_kv_controllers", "document_forward_kwargs", "ModelConfig",
    "ARCHITECTURES", "paper_800m", "transformer_config",
]
