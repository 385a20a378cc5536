"""ernie-paddle: ERNIE-4.5 (MoE and dense) in PaddlePaddle, with an ONNX export pipeline.

Importing the package is light (no Paddle): the model lives in `ernie_paddle.modeling`, checkpoints in
`ernie_paddle.checkpoint`, generation in `ernie_paddle.generation`.
"""

__version__ = "0.1.0"

from .config import ErnieConfig, preset  # noqa: E402  (numpy-free, cheap)
from .errors import CheckpointError, ConfigDefaultWarning, ConfigError, ErnieError, InputError  # noqa: E402

__all__ = ["ErnieConfig", "preset", "ErnieError", "ConfigError", "CheckpointError", "InputError",
           "ConfigDefaultWarning", "__version__"]
