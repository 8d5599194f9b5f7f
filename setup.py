"""Install audio_llm: `pip install -e .[dev]` (the Makefile installs a CPU torch first)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="audio_llm",
    version="0.1.0",
    description=(
        "Train speech LLMs: frozen Whisper encoder -> projector -> Qwen2-VL with regex-targeted "
        "LoRA, on DeepSpeed ZeRO from WebDataset shards."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["audio_llm", "audio_llm.*"]),
    package_data={"audio_llm": ["assets/*.txt", "assets/reader/*"]},
    install_requires=[
        # Loose on purpose: clusters bring their own CUDA torch. The Makefile pins a CPU wheel.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "peft>=0.17",
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "jiwer>=3.0",
        "whisper-normalizer>=0.1.15",  # Whisper's English normaliser, packaged (tested 0.1.15)
        "regex>=2022.1",
        "numpy>=1.24",
        "soundfile>=0.12",
        "soxr>=0.3",
        "kaldiio>=2.17",  # reads Kaldi ark offsets in wav.scp (pack opens the files itself)
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "tqdm>=4.60",
    ],
    extras_require={
        # flash-attention's varlen kernels for packed rows (model.attn_implementation=auto picks
        # them on CUDA); needs a CUDA toolchain to build, so never a requirement
        "flash": ["flash-attn>=2.6"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.8",  # 3.8: --no-loadscope-reorder
            "ruff>=0.6",
            "torchmetrics>=1.0",
            # writes CTranslate2 models for the round-trip test of our reader (tested 4.8.5)
            "ctranslate2>=4.0,<5",
        ],
    },
    entry_points={"console_scripts": ["audio-llm=audio_llm.cli:main"]},
)
