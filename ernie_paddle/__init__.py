"""ernie-paddle: ERNIE-4.5 (MoE and dense) in PaddlePaddle, with an ONNX export pipeline.

Importing the package is light (no Paddle): the model lives in `ernie_paddle.paddle.modeling`, checkpoints in
`ernie_paddle.checkpoint.folder`, generation in `ernie_paddle.generation`.
"""

__version__ = "0.3.0.dev0"

from ernie_paddle.config import ErnieConfig, preset  # noqa: E402  (numpy-free, cheap)
from ernie_paddle.errors import CheckpointError, ConfigDefaultWarning, ConfigError, ErnieError, InputError  # noqa: E402

__all__ = ["ErnieConfig", "preset", "ErnieError", "ConfigError", "CheckpointError", "InputError",
           "ConfigDefaultWarning", "__version__"]
