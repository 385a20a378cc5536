"""Serving an ERNIE-4.5 model: continuous batching over KV-cache slots, and an OpenAI-compatible HTTP server.

`slots` keeps each running request's KV cache in one row of a preallocated pool; `engine` schedules requests
into those rows between decode steps. `protocol` checks OpenAI requests, `responses` builds the answers, `text`
streams their text (stop strings held back), `bridge` carries engine events to the event loop, `metrics` counts
for Prometheus, `app` holds the routes and `server` runs uvicorn with a graceful SIGTERM (`ernie_paddle.cli.serve`
is the `serve` command of both CLIs). None of them imports Paddle or ONNX Runtime: both models plug into the same
interface, `causal_lm.CausalLM`.
"""
