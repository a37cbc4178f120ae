"""``python -m igpt …``: the ``igpt`` console script."""
import sys

from igpt.cli import main

sys.exit(main())
