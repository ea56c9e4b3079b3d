"""The package version, in one place: the package root and artifacts read it."""

__version__ = "0.2.0"
