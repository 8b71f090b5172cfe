"""semantic: per-agent KV caches kept in a pool of 256-token blocks, on MLX and mlx-lm."""

from setuptools import find_packages, setup

setup(
    name="semantic",
    version="0.1.0",
    description="Keep every agent's LLM KV cache in a pool of fixed 256-token blocks (MLX / mlx-lm)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["semantic", "semantic.*"]),
    install_requires=[
        "mlx>=0.32,<0.33",
        # Every touch of mlx-lm internals lives in semantic/adapters/mlx_lm_adapter.py,
        # which is tested against this range.
        "mlx-lm>=0.32.2,<0.33",
        "numpy",
        "tokenizers>=0.20",
        # semantic.models reads and dequantizes the GGUF files of the default models.
        "gguf>=0.17",
    ],
    extras_require={
        "cpu": ["mlx[cpu]>=0.32,<0.33"],
        "cuda": ["mlx[cuda13]>=0.32,<0.33"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "asv==0.6.6",
            "asv_runner>=0.3,<0.4",
            "selenium>=4.20",  # drives Debian's chromium in the dashboard test
            "virtualenv",
            "jsonschema>=4.18",  # EXP-006's results files are checked against experiments/exp_006_schema.py
            "matplotlib",
            "tqdm",
        ],
    },
)
