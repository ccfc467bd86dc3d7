"""Exceptions shared by :mod:`models` and :mod:`realtime` (which re-exports them)."""

__all__ = ["TarabError", "ParameterError", "BundleError", "DataError"]


class TarabError(Exception):
    """Root of every error tarab raises on purpose.

    The CLI turns any ``TarabError`` into a one-line message and a non-zero exit status.
    """


class ParameterError(TarabError, ValueError):
    """A parameter has a value outside what is allowed.

    Messages name the parameter, the value received and the allowed values or range.
    """


class BundleError(TarabError):
    """A model bundle is missing, corrupt, or does not match the engine's configuration."""


class DataError(TarabError):
    """A data set or audio file cannot be used (empty, unreadable, too few pieces, ...)."""


def check_range(name, value, lo=None, hi=None, *, kind=float):
    """Validate a scalar parameter and return it converted to ``kind``.

    Parameters
    ----------
    name : str
        Parameter name used in the error message.
    value : number
        Value received.
    lo, hi : number or None
        Inclusive bounds (None = unbounded).
    kind : type
        ``int`` or ``float``.

    Raises
    ------
    ParameterError
        If ``value`` is not a number of that kind or is out of range.
    """
    try:
        if kind is int and (isinstance(value, bool) or int(value) != value):
            raise TypeError
        v = kind(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if v != v:  # NaN
        raise ParameterError(f"{name}: got NaN")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ParameterError(f"{name}: value {value!r} is out of range [{lo_s}, {hi_s}]")
    return v
