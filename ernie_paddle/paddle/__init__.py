"""Everything that imports Paddle: the model, its kernels and weights, distributed inference, the fp32 reference of
the parity report, the portable export and GPTQ's calibration. No module outside this package imports Paddle;
`tests/test_architecture.py` holds the rest of the project to that.

Importing this package first applies the process settings that must precede `import paddle` (`env`)."""

from ernie_paddle.paddle import env as _env  # noqa: F401  (thread / MKL / SIGTERM settings before any Paddle import)
