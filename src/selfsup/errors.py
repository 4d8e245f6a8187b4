"""The project's own errors: each has a message meant for a person, shown without a traceback."""


class SelfsupError(Exception):
    """Base class: a problem the user can fix (bad input, missing data, bad config)."""


class ConfigError(SelfsupError):
    """An unknown, ill-typed or out-of-range configuration value."""


class DataError(SelfsupError):
    """Data missing, damaged (wrong checksum, truncated), unreadable or refused as unsafe."""


class CheckpointError(SelfsupError):
    """A checkpoint that cannot be resumed: missing, damaged, or from a different run setup."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal (Ctrl-C's SIGINT, or SIGTERM as sent by ``timeout``, schedulers and
    container runtimes); ``signum`` says which. The exit status is 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
