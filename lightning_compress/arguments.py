"""Checks of argument values shared by the callbacks and the app: the value, its type and what is allowed."""

from __future__ import annotations

import dataclasses
import numbers
from typing import TypeVar

Settings = TypeVar("Settings")


def is_number(value: object) -> bool:
    """A real number (an int, a float, a numpy scalar), not a bool.

    Example:
        >>> is_number(0.5), is_number("0.5"), is_number(True)
        (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """A whole number (an int, a numpy integer), not a bool.

    Example:
        >>> is_int(3), is_int(3.0), is_int(True)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_argument(name: str, value: object, allowed: bool, what: str) -> None:
    """Fail naming the argument, its value and type, and ``what`` it may be, unless ``allowed``.

    Example:
        >>> check_argument("amount", "0.5", is_number("0.5"), "a number in [0, 1)")
        Traceback (most recent call last):
        ...
        ValueError: amount must be a number in [0, 1); got '0.5' (str)
    """
    if not allowed:
        raise ValueError(f"{name} must be {what}; got {value!r} ({type(value).__name__})")


def config_or_arguments(config: Settings | None, from_arguments: Settings) -> Settings:
    """``config`` where given (then every argument that makes the same settings must be left at its default),
    else the settings made from the arguments, ``from_arguments`` (a frozen dataclass such as ``PruningConfig``
    whose defaults make valid settings).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Settings:
        ...     amount: float = 0.5
        >>> config_or_arguments(Settings(0.9), Settings()).amount
        0.9
        >>> config_or_arguments(Settings(0.9), Settings(0.1))
        Traceback (most recent call last):
        ...
        ValueError: give the settings as config=Settings(...) or as arguments, not both: got config and ['amount']
    """
    if config is None:
        return from_arguments
    kind = type(from_arguments)
    if not isinstance(config, kind):
        raise ValueError(f"config must be a {kind.__name__}, got {type(config).__name__}")
    defaults = kind()  # as made, so a setting its checks fill in (an implied amount) is no argument given
    given = [
        field.name
        for field in dataclasses.fields(kind)
        if getattr(from_arguments, field.name) != getattr(defaults, field.name)
    ]
    if given:
        raise ValueError(
            f"give the settings as config={kind.__name__}(...) or as arguments, not both: got config and {given}"
        )
    return config
