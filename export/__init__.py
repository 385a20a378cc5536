"""ONNX export of ERNIE-4.5 checkpoints (installed as `ernie_paddle.export`).

`pipeline.export` turns a checkpoint folder into a verified ONNX model folder in one of two flavours:
`ort_graph` (ONNX Runtime's fused operators, fp32/fp16/int8/int4/int2, built tensor by tensor through `graph`) or
`portable` (standard ONNX operators, through paddle2onnx). `quantize` and `gptq` make the integer weights,
`verify` compares a folder with the Paddle model, `genai` writes onnxruntime-genai's config. `gguf` writes the
same checkpoint as a GGUF file for llama.cpp.
"""
