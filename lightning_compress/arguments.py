"""Checks of argument values shared by the callbacks and the app: the value, its type and what is allowed."""

from __future__ import annotations

import numbers


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
