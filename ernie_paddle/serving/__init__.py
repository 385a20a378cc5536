"""Serving an ERNIE-4.5 model: continuous batching over KV-cache slots, and an OpenAI-compatible HTTP server.

`slots` keeps each running request's KV cache in one row of a preallocated pool; `engine` schedules requests
into those rows between decode steps. `protocol` checks OpenAI requests, `responses` builds the answers, `text`
streams their text (stop strings held back), `bridge` carries engine events to the event loop, `metrics` counts
for Prometheus, `app` holds the routes, `server` runs uvicorn with a graceful SIGTERM, and `cli` is the `serve`
command of both CLIs. None of them imports Paddle: the ONNX Runtime model serves with `onnxruntime` alone, and the
Paddle model plugs into the same interface.
"""
