"""The ``pxcompile`` command: :mod:`.main` parses and dispatches, one module per subcommand
(:mod:`.trace`, :mod:`.bench`, :mod:`.check`, :mod:`.calibrate`; :mod:`.compile_model` for
model files), and :mod:`.common` holds what they share."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
