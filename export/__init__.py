"""ONNX export pipeline (installed as `ernie_paddle.export`); see issue 3."""
