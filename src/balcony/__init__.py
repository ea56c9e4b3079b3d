"""balcony: elastic depth for any Hugging Face decoder-only language model.

    from balcony import BalconyModel
    model = BalconyModel.from_base(None, exits=[15, 20, 25])   # the embedded default model
    model.generate(**inputs, exit_layer=15, max_new_tokens=32)
"""

__version__ = "0.1.0"

from .core.config import BalconyConfig  # noqa: E402
from .core.errors import (  # noqa: E402
    ArtifactError,
    BalconyError,
    BaseMismatchError,
    ExitError,
    UnsupportedArchitectureError,
)
from .core.model import BalconyModel, ExitOutputs, load_base  # noqa: E402
from .core.policy import DepthRequest  # noqa: E402
from . import decoding  # noqa: E402,F401  (registers generate's speculative and dynamic modes)

__all__ = [
    "ArtifactError",
    "BalconyConfig",
    "BalconyError",
    "BalconyModel",
    "BaseMismatchError",
    "DepthRequest",
    "ExitError",
    "ExitOutputs",
    "UnsupportedArchitectureError",
    "__version__",
    "load_base",
]
