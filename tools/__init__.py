"""Command-line programs and benchmarks (installed as `ernie_paddle.tools`); each runs with `--help`."""
