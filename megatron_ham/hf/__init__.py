"""Hugging Face export of megatron-ham models.

    import megatron_ham.hf                      # registers model_type "megatron_ham"
    AutoModelForCausalLM.from_pretrained(dir)   # uses HAMForCausalLM from this package

Export directories also carry the modeling code (auto_map), so in a process without
megatron_ham: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).
Conversion: `ham-convert-hf` (megatron_ham.hf.convert), docs/export.md.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ham import HAMConfig
from .modeling_ham import HAMCache, HAMForCausalLM, HAMModel


def _register() -> None:
    try:
        AutoConfig.register(HAMConfig.model_type, HAMConfig)
    except ValueError:  # already registered (re-import)
        pass
    for auto, cls in ((AutoModel, HAMModel), (AutoModelForCausalLM, HAMForCausalLM)):
        try:
            auto.register(HAMConfig, cls)
        except ValueError:
            pass


_register()

__all__ = ["HAMConfig", "HAMForCausalLM", "HAMModel", "HAMCache"]
