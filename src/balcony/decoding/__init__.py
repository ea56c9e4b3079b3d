"""Decoding beyond one fixed exit: sampling helpers, self-speculative decoding, dynamic per-token exits.

Importing this package registers `generate(mode="speculative")` and `generate(mode="dynamic")`.
"""

from . import dynamic, speculative  # noqa: F401  (register their modes)
