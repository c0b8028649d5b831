"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit."""


class FedzipError(Exception):
    """Base class for every error fedzip reports to a user."""

    exit_code = 1


class ConfigError(FedzipError):
    """A configuration is invalid: unknown key, wrong type, impossible value, missing file."""

    exit_code = 2


class DataError(FedzipError):
    """A data source cannot be read or does not have the expected shape."""

    exit_code = 2


class ModelError(FedzipError):
    """A model cannot be found or loaded."""

    exit_code = 2


class PayloadError(FedzipError):
    """A payload received over the wire is malformed, truncated, oversized or unexpected."""

    exit_code = 3


class ClientFailure(FedzipError):
    """A client could not produce a valid reply (its training diverged, its state is unusable): it counts as a
    failed client of its round, never as the end of the run."""

    exit_code = 4


class TooFewReplies(FedzipError):
    """Fewer clients of a round replied with a valid update than ``deploy.min_reply_fraction`` needs: the run
    stops after its last completed round and can be resumed."""

    exit_code = 4


class RunDirError(FedzipError):
    """A run directory is missing, incomplete or does not match the config being resumed."""

    exit_code = 2


class QualityGateError(FedzipError):
    """A learned component failed the quality check it must pass before the run may rely on it."""

    exit_code = 4


class MissingExtra(FedzipError):
    """An optional part of fedzip is used without the packages of its extra (``pip install 'fedzip[x]'``)."""

    exit_code = 2


def require(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Raise one clear :class:`MissingExtra` line when any of ``modules`` is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}: pip install 'fedzip[{extra}]'")
