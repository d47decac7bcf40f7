"""megatron-ham: Hybrid Associative Memory (HAM) language models on Megatron-Core.

Layout (data flows one way: recipe -> config -> model/data -> loop -> checkpoint -> export):
  ops/        framework-free HAM math (tensors in, tensors out; no megatron imports)
  kernels/    GPU paths of the ops (fla, FlexAttention), chosen by ops when on CUDA
  layers/     Megatron-Core modules and ModuleSpecs (HAMMixer, GDN, SDPA attention)
  models/     pattern string -> per-layer specs -> GPTModel; the paper's four architectures
  training/   recipe/config, data, checkpointing, the loop
  hf/         Hugging Face model (AutoModelForCausalLM) for exported checkpoints
"""

__version__ = "0.1.0"
