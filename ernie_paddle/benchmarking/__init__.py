"""Support for the benchmark programs in `tools/`: charts, measurements in a child process, llama.cpp's state."""
