"""Subcommands of the ``af2-hf`` command line, one module each (see ``af2_hf.cli.COMMAND_MODULES``)."""
