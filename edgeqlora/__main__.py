"""``python -m edgeqlora``: the same command line as the ``edgeqlora`` script."""

import sys

from .cli import main

sys.exit(main())
