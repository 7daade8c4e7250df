"""``python -m helpers``: see :mod:`helpers.cli`."""

import os
import sys

try:
    from helpers.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first instants, before the command line takes over
    if not os.environ.get("FLUX_HELPERS_STAGE_CHILD"):  # a stage of `generate`: its parent says it
        print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
