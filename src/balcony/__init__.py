"""balcony: elastic depth for any Hugging Face decoder-only language model.

    from balcony import BalconyModel
    model = BalconyModel.from_base(None, exits=[15, 20, 25])   # the embedded default model
    out = model.generate(**inputs, budget=0.6, max_new_tokens=32, return_dict_in_generate=True)
    out.sequences, out.exit_layer                               # the tokens and the exit that ran

What is imported here is the supported API; everything else may change between 0.x releases.
"""

from .version import __version__
from .core.config import BalconyConfig  # noqa: E402
from .core.errors import (  # noqa: E402
    ArtifactError,
    BalconyError,
    BaseMismatchError,
    ExitError,
    UnsupportedArchitectureError,
)
from .core.generation import BalconyGenerateOutput  # noqa: E402
from .core.model import BalconyModel, ExitOutputs, load_base  # noqa: E402
from .core.policy import FULL, CostTable, DepthPolicy, DepthRequest  # noqa: E402
from . import decoding  # noqa: E402,F401  (registers generate's speculative and dynamic modes)

__all__ = [
    "ArtifactError",
    "BalconyConfig",
    "BalconyError",
    "BalconyGenerateOutput",
    "BalconyModel",
    "BaseMismatchError",
    "CostTable",
    "DepthPolicy",
    "DepthRequest",
    "ExitError",
    "ExitOutputs",
    "FULL",
    "UnsupportedArchitectureError",
    "__version__",
    "load_base",
]
