"""``python -m helpers``: see :mod:`helpers.cli`."""

import os
import sys


def _exit_interrupted() -> None:
    """End with status 130. Not through ``sys.exit``: when the interrupt went through an ``exec``
    (dataclasses and other libraries run generated code while they import), CPython keeps it marked
    as unhandled although it was handled, and would end the process by SIGINT instead."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


try:
    from helpers.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first instants, before the command line takes over
    if not os.environ.get("FLUX_HELPERS_STAGE_CHILD"):  # a stage of `generate`: its parent says it
        print("interrupted", file=sys.stderr)
    _exit_interrupted()

code = main()
if code == 130:
    _exit_interrupted()
sys.exit(code)
