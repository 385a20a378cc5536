"""Serving an ERNIE-4.5 model: continuous batching over KV-cache slots, and an OpenAI-compatible HTTP server.

`slots` keeps each running request's KV cache in one row of a preallocated pool; `engine` schedules requests
into those rows between decode steps. Neither imports Paddle: the ONNX Runtime model serves with `onnxruntime`
alone, and the Paddle model plugs into the same interface.
"""
