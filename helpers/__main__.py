"""``python -m helpers``: see :mod:`helpers.cli`."""

import os
import sys


def _exit_interrupted(code: int = 130) -> None:
    """End with status ``code`` (130, or 143 / 129 when stopped by SIGTERM / SIGHUP). Not through
    ``sys.exit``: when the interrupt went through an ``exec`` (dataclasses and other libraries run
    generated code while they import), CPython keeps it marked as unhandled although it was handled,
    and would end the process by SIGINT instead."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # SIGHUP: the terminal may be gone
            pass
    os._exit(code)


try:
    from helpers.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first instants, before the command line takes over
    if not os.environ.get("FLUX_HELPERS_STAGE_CHILD"):  # a stage of `generate`: its parent says it
        print("interrupted", file=sys.stderr)
    _exit_interrupted()

code = main()
if code in (129, 130, 143):  # stopped by SIGHUP, Ctrl-C or SIGTERM
    _exit_interrupted(code)
sys.exit(code)
