"""The engine's own errors, one tree: what a caller can tell apart, and what a person reads.

    GlazeError                      anything the engine refuses or cannot do, named clearly
    ├── InputError                  the caller's input is wrong; fix it and ask again
    │   ├── NotFoundError           an id that names nothing
    │   │   ├── UnknownTableError, UnknownColumnError, UnknownRowError, UnknownRequestError
    │   ├── InvalidSelectionError   a selection, budget or job setting out of range
    │   ├── CsvImportError          a file that cannot be imported cleanly (line and reason)
    │   └── ConfigError             a providers file or a setting that cannot be used
    └── ServiceUnavailableError     the database, Redis or Dagster cannot be reached

The CLI prints any GlazeError as one line and exits 2; the API (later) maps InputError to 4xx
and ServiceUnavailableError to 503. Messages never carry a configured secret (see `redact`).
"""

from __future__ import annotations


class GlazeError(Exception):
    """Base of the engine's own errors: bad input named clearly, raised before any write."""


class InputError(GlazeError):
    """The caller's input is wrong (a request, a file, an option): nothing was written."""


class NotFoundError(InputError):
    """An id that names nothing."""


class UnknownTableError(NotFoundError):
    pass


class UnknownColumnError(NotFoundError):
    pass


class UnknownRowError(NotFoundError):
    pass


class UnknownRequestError(NotFoundError):
    pass


class InvalidSelectionError(InputError):
    """A selection, budget, count or job setting that cannot be run."""


class CsvImportError(InputError):
    """A CSV that cannot be imported cleanly; the message names the line and the reason."""


class ConfigError(InputError):
    """A configuration (providers file, setting, secret) that cannot be used."""


class ServiceUnavailableError(GlazeError):
    """A service the engine needs (database, Redis, Dagster) cannot be reached."""
