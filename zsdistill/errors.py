"""User-facing errors: one clear line on stderr, non-zero exit, no traceback."""

import os
import sys
from typing import Any, Callable

import fire


class UserError(Exception):
    """A mistake the user can fix: the message says what, where and how."""


EXIT_USER_ERROR = 2


def run_cli(main: Callable[..., Any]) -> None:
    """Run `main` as a fire CLI; UserError becomes `error: <message>` and exit status 2.

    Set ZSDISTILL_DEBUG=1 (or pass --debug) to see the full traceback instead.
    """
    debug = os.environ.get("ZSDISTILL_DEBUG") == "1" or "--debug" in sys.argv
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        # fire prints the return value; our stages print what they must themselves.
        fire.Fire(main, serialize=lambda _: None)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
