"""The package's version, recorded in run folders, checkpoints and packed files."""

__version__ = "0.1.0"
