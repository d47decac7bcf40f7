"""Layer pattern -> per-layer specs -> Megatron GPTModel; the paper's four architectures.

Public API (stable; used by megatron_ham.training):
    ModelConfig                                   typed model settings (recipe YAML maps 1:1)
    build_model(cfg, *, pre_process, post_process, vp_stage=None) -> GPTModel
    transformer_config(cfg) -> TransformerConfig  (the one derivation, at the current TP/PP)
    presets: paper_800m(architecture) -> ModelConfig, PAPER_ARCHITECTURES
Re-exported from where they live (megatron_ham.layers): step_kv_controllers(model_chunks,
dp_group) (the HAM kind's controller step, after each optimizer step) and
document_forward_kwargs(tokens [b, s], eod_id) (document boundaries for the model forward).
"""
from megatron_ham.layers.documents import document_forward_kwargs
from megatron_ham.layers.kinds import SettingError, step_kv_controllers

from .builder import build_model, transformer_config
from .config import ModelConfig, architectures
from .presets import PAPER_ARCHITECTURES, paper_800m

__all__ = [
    "build_model", "step_kv_controllers", "document_forward_kwargs", "ModelConfig", "SettingError",
    "architectures", "paper_800m", "PAPER_ARCHITECTURES", "transformer_config",
]
