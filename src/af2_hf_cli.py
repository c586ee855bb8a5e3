"""Entry point of the ``af2-hf`` console script: the command line is parsed before torch and transformers load.

``import af2_hf`` registers Audio Flamingo 2 with transformers' Auto classes, so it imports torch and transformers
(seconds). The console script needs only :mod:`af2_hf.cli` and the :mod:`af2_hf.commands` modules to build its
parser, so this module creates the ``af2_hf`` package object without running its ``__init__`` yet; the ``__init__``
runs (and registers the Auto classes) in :func:`af2_hf.cli.main` once a command is about to run. ``af2-hf --help``,
each subcommand's ``--help`` and usage errors therefore return without importing torch or transformers. Everywhere
else (``import af2_hf`` in user code, ``python -m af2_hf.cli``) the package imports as usual.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]

#: Set on the package object while its ``__init__`` has not run yet (see :func:`af2_hf.cli.complete_package_import`).
DEFERRED_INIT_FLAG = "_af2_hf_init_deferred"


def _defer_package_init() -> None:
    if "af2_hf" in sys.modules:
        return
    spec = importlib.util.find_spec("af2_hf")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'af2_hf': the af2-hf package is not installed.", name="af2_hf")
    package = importlib.util.module_from_spec(spec)  # __path__, __spec__ set; the body has not run
    setattr(package, DEFERRED_INIT_FLAG, True)
    sys.modules["af2_hf"] = package


def main(argv: list[str] | None = None) -> int:
    _defer_package_init()
    from af2_hf.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
