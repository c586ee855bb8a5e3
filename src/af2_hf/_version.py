"""The af2-hf release version (the single source: setup.cfg reads it, ``af2_hf.__version__`` re-exports it)."""

__version__ = "0.1.0"
