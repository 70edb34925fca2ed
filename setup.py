"""mmada_jax: a JAX/TPU-native reimplementation of MMaDA."""
from setuptools import find_packages, setup

# Ranges admit the versions that install on Python 3.11 (jax 0.10.2, flax 0.12.8) and on
# Python 3.12 / Colab (jax 0.12, flax 0.12.12). requirements-lock.txt pins one tested set.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorstore>=0.1.86,<0.2",
    "ml-collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "numpy>=1.26",
    "ml_dtypes>=0.5",
    "safetensors>=0.5",
    "tokenizers>=0.20",
    "tqdm>=4.66",
    "pyarrow>=14",   # parquet benchmark files (python -m mmada_jax.eval)
    "tensorboardX>=2.6",
    "pillow>=10",
    "matplotlib>=3.8",
    "scikit-learn>=1.4",
    "psutil>=5.9",
    # UniGRPO answer equivalence beyond the rules of mmada_jax.rl.answers (LaTeX / expressions).
    "math-verify>=0.9.0,<0.10",
    # Weight-only quantization (int8 / int4) and LoRA / QLoRA of the Flax model.
    "qwix>=0.1.8,<0.2",
]

setup(
    name="mmada_jax",
    version="0.1.0",
    description="MMaDA (multimodal large diffusion language model) in JAX/Flax for TPU and GPU",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # configs/ (the one source of the experiment configs) ships as mmada_jax.configs, so an installed
    # package (wheel or editable) finds its presets from any working directory.
    packages=find_packages(include=["mmada_jax", "mmada_jax.*"]) + ["mmada_jax.configs"],
    package_dir={"mmada_jax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        "cuda": ["jax[cuda12]>=0.10.2,<0.13"],
        # lm-eval model class mmada_jax.eval.lm_eval_model (its core needs no torch).
        "eval": ["lm-eval==0.4.13"],
        # setuptools, wheel: tests/test_packaging.py builds the wheel offline (--no-build-isolation;
        # Python 3.12 venvs come without setuptools, 3.11's without wheel).
        "dev": ["pytest>=8", "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6", "setuptools>=64", "wheel>=0.40"],
    },
)
