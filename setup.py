"""megatron-ham: pretraining Hybrid Associative Memory (HAM) language models on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron-ham",
    version="0.1.0",
    description="Hybrid Associative Memory (HAM) layers, models and pretraining on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ham", "megatron_ham.*", "data_prep", "data_prep.*"]),
    include_package_data=True,
    package_data={"data_prep": ["sample/**/*", "manifests/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "pyyaml",
        "einops",
        "tqdm",
        "psutil",
        "zstandard",
        "pyarrow",
        "tokenizers",
        "transformers>=4.45",
        "safetensors",
        "webdataset",
        "tensorboard",
    ],
    extras_require={
        # GPU kernels: fla's chunked gated-delta-rule (Triton / TileLang on Hopper), liger-kernel's
        # fused SwiGLU (docs/design.md "The MLP's SwiGLU on liger-kernel").
        "gpu": ["fla-core==0.6.0", "flash-linear-attention==0.6.0", "triton>=3.2", "liger-kernel==0.8.5"],
        # Optional accelerator; installable only on CUDA machines with a toolkit.
        "te": ["transformer-engine[pytorch]"],
        # ham-eval's PNG plots (imported lazily; without it ham-eval writes no plots).
        "eval": ["matplotlib==3.11.2"],
        # CPU test environment: fla's pure-torch references need an importable triton;
        # lm-evaluation-harness runs on an exported tiny model (tests/test_eval_lm_eval.py).
        "test": ["pytest>=8", "pytest-timeout", "fla-core==0.6.0", "flash-linear-attention==0.6.0", "triton",
                 "matplotlib==3.11.2", "lm-eval[hf]==0.4.13"],
    },
    entry_points={"console_scripts": ["ham-prep-data = data_prep.cli:main",
                                     "ham-convert-hf = megatron_ham.hf.convert:main",
                                     "ham-import-hf = megatron_ham.hf.import_hf:main",
                                     "ham-eval = megatron_ham.eval.cli:main",
                                     "ham-train = megatron_ham.train:main"]},
)
