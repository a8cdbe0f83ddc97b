"""Stage options as dataclasses, the way `transformers.TrainingArguments` does them.

Each field holds its default and its one-line help (`option(default, "help")`); the dataclass's `__post_init__`
checks the values once, raising the same one-line UserError a user has always seen; `dataclasses.asdict(options)`
is what a stage saves. `cli(Options, run)` builds the function fire calls: its keyword-only parameters are the
fields (so fire parses the flags), its docstring their help (so `--help` lists every flag).
"""

import dataclasses
import inspect
import textwrap
from typing import Any, Callable

from zsdistill.errors import UserError

HELP_WIDTH = 110


def option(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with its help text (no default: the flag is required)."""
    return dataclasses.field(default=default, metadata={"help": help})


def whole_number(value: Any, flag: str, advice: str, minimum: int = 0, allow_none: bool = False) -> int | None:
    """`value` if an integer of at least `minimum` (or None where allowed), else a one-line error naming the flag."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{flag} must be {advice}, got {value!r}")
    return value


def number_in(value: Any, flag: str, advice: str, low: float, high: float) -> float:
    """`value` as a float if a number (not a bool) in [low, high], else a one-line error naming the flag."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UserError(f"--{flag} must be {advice}, got {value!r}")
    return float(value)


def cli(options_class: type, run: Callable, summary: str, extra: str | None = None, extra_help: str = "") -> Callable:
    """The stage's `main`: takes the fields as keyword arguments (and, with `extra`, any others, passed to `run` as
    the dict `extra`), builds the options (checked) and returns `run(options)` or `run(options, extra)`."""
    fields = [f for f in dataclasses.fields(options_class) if f.init]
    names = {f.name for f in fields}

    def main(**kwargs):
        unknown = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        if unknown and extra is None:
            raise UserError(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join('--' + k for k in unknown)}")
        options = options_class(**kwargs)
        return run(options, unknown) if extra is not None else run(options)

    parameters = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
            annotation=f.type,
        )
        for f in fields
    ]
    if extra is not None:
        parameters.append(inspect.Parameter(extra, inspect.Parameter.VAR_KEYWORD))
    main.__signature__ = inspect.Signature(parameters)
    lines = [summary, "", "Args:"]
    for f in fields:
        lines += textwrap.wrap(
            f"{f.name}: {f.metadata.get('help', '')}", HELP_WIDTH, initial_indent="    ", subsequent_indent="        "
        )
    if extra is not None:
        lines += textwrap.wrap(
            f"{extra}: {extra_help}", HELP_WIDTH, initial_indent="    ", subsequent_indent="        "
        )
    main.__doc__ = "\n".join(lines)
    main.__name__ = main.__qualname__ = "main"
    return main
