"""User-facing errors: one clear line on stderr, non-zero exit, no traceback."""

import contextlib
import errno
import os
import sys
from typing import Any, Callable, Iterator

import fire


class UserError(Exception):
    """A mistake the user can fix: the message says what, where and how."""


EXIT_USER_ERROR = 2

# OS errors while writing that the user fixes outside the program: a full disk or quota, a read-only or
# unwritable place, a file too big for the filesystem.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def writing_to(directory: str, what: str, advice: str) -> Iterator[None]:
    """Make `directory` and run the block; a full disk (or another such OS error) becomes one line naming the
    directory and what to do. Writers inside write each file atomically, so no half-written file is left."""
    try:
        os.makedirs(directory, exist_ok=True)
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise UserError(
            f"cannot write {what} in {os.path.abspath(directory)}: {os.strerror(e.errno)}; {advice}"
        ) from None


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
