"""Errors balcony raises. Each message names the problem and the fix."""


class BalconyError(Exception):
    """Base class of every error balcony raises on bad input."""


class UnsupportedArchitectureError(BalconyError, TypeError):
    """The base model's architecture has no entry in the architecture table."""


class ExitError(BalconyError, ValueError):
    """An exit index that is out of range or has no balcony."""


class ArtifactError(BalconyError, OSError):
    """A balcony artifact that is missing, corrupt or incomplete."""


class BaseMismatchError(BalconyError, ValueError):
    """An artifact loaded onto a base model it was not trained for."""
