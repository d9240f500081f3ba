"""``python -m pxcompile``: the same as the ``pxcompile`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
