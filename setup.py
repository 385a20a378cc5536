"""Packaging for ernie-paddle.

The user's layout keeps `export/` and `tools/` at the top level; they are installed as
`ernie_paddle.export` and `ernie_paddle.tools` (as PaddleOCR maps its folders into one package), so no
generic top-level name lands in site-packages. Works for `pip install .` and `pip install -e .`.
"""

import os
import re

from setuptools import setup

# the version is written once, in ernie_paddle/__init__.py (read as text: importing it needs the dependencies)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("ernie_paddle/__init__.py", encoding="utf-8").read(), re.M)[1]

# `ERNIE_PADDLE_GPU=1 pip install -e .` is for GPU machines: it leaves out the CPU Paddle wheel (install Paddle's
# GPU build from Paddle's own index first; both provide `paddle`) and takes onnxruntime-gpu instead of
# onnxruntime (both provide `onnxruntime`, so one replaces the other, never both).
GPU = os.environ.get("ERNIE_PADDLE_GPU") == "1"
PADDLE = [] if GPU else ["paddlepaddle==3.3.1"]
ORT = ["onnxruntime-gpu>=1.22"] if GPU else ["onnxruntime>=1.22"]

setup(
    name="ernie-paddle",
    version=VERSION,
    description="ERNIE-4.5 MoE (21B-A3B) in PaddlePaddle, with ONNX export and an ONNX Runtime runtime",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ernie_paddle", "ernie_paddle.benchmarking", "ernie_paddle.checkpoint", "ernie_paddle.cli",
              "ernie_paddle.ort", "ernie_paddle.paddle", "ernie_paddle.parity", "ernie_paddle.serving",
              "ernie_paddle.text", "ernie_paddle.export", "ernie_paddle.tools"],
    package_dir={"ernie_paddle": "ernie_paddle", "ernie_paddle.export": "export", "ernie_paddle.tools": "tools"},
    # the shipped trained model (the default --model) and its corpus: a few MB, installed with the package
    package_data={"ernie_paddle": ["models/ernie-4.5-shakespeare/*", "data/*"]},
    install_requires=[
        "numpy>=1.24",
        "onnx>=1.17",  # the exporter's graph builder
        "paddle2onnx==2.1.0",  # the portable flavour (pins onnx 1.17)
        "sentencepiece>=0.2",  # tokenizer.model
        "tokenizers>=0.19",  # tokenizer.json
        "jinja2>=3.1",  # checkpoints' chat templates, rendered in its sandbox as transformers does
        "llguidance>=1.1",  # structured output: response_format, forced tool calls, --json-schema (grammar.py)
    ] + PADDLE + ORT,
    extras_require={
        # The independent oracle for tests; never imported at run time.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.54", "safetensors>=0.4",
                 "onnxruntime-genai>=0.18", "matplotlib", "hypothesis>=6", "gguf>=0.17", "openai>=1.0",
                 "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "jsonschema>=4", "pydantic>=2",
                 "lm_eval[api]==0.4.13"],  # lm-evaluation-harness against the server (tests/test_eval_api.py)
        # `ernie-onnx serve` / `ernie-paddle serve`: the OpenAI-compatible HTTP server
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
        # benchmarks: charts, GGUF files; llama-cpp-python builds llama.cpp from source (see README)
        "bench": ["matplotlib", "gguf>=0.17", "llama-cpp-python>=0.3.16"],
    },
    entry_points={"console_scripts": ["ernie-paddle=ernie_paddle.cli.paddle_cli:main",
                                    "ernie-onnx=ernie_paddle.cli.onnx_cli:main"]},
)
