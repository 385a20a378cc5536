"""Packaging for ernie-paddle.

The user's layout keeps `export/` and `tools/` at the top level; they are installed as
`ernie_paddle.export` and `ernie_paddle.tools` (as PaddleOCR maps its folders into one package), so no
generic top-level name lands in site-packages. Works for `pip install .` and `pip install -e .`.
"""

import os

from setuptools import setup

# `ERNIE_PADDLE_GPU=1 pip install -e .` leaves out the CPU wheel, for machines where Paddle's GPU build
# (from Paddle's own package index) is already installed; both provide the `paddle` module.
PADDLE = [] if os.environ.get("ERNIE_PADDLE_GPU") == "1" else ["paddlepaddle==3.3.1"]

setup(
    name="ernie-paddle",
    version="0.1.0",
    description="ERNIE-4.5 MoE (21B-A3B) in PaddlePaddle, with ONNX export and an ONNX Runtime runtime",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ernie_paddle", "ernie_paddle.export", "ernie_paddle.tools"],
    package_dir={"ernie_paddle": "ernie_paddle", "ernie_paddle.export": "export", "ernie_paddle.tools": "tools"},
    install_requires=[
        "numpy>=1.24",
        "onnxruntime>=1.22",  # the ONNX runtime (CUDA: install onnxruntime-gpu instead; same module)
        "onnx>=1.17",  # the exporter's graph builder
        "paddle2onnx==2.1.0",  # the portable flavour (pins onnx 1.17)
    ] + PADDLE,
    extras_require={
        # The independent oracle for tests; never imported at run time.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.54", "safetensors>=0.4",
                 "onnxruntime-genai>=0.18"],
    },
    entry_points={"console_scripts": ["ernie-paddle=ernie_paddle.cli:main", "ernie-onnx=ernie_paddle.onnx_cli:main"]},
)
