"""Errors a user can hit, each with a stable exit code (documented in `pfx --help` and the README).

The CLI maps any PfxError to its message on stderr and its exit code; no traceback unless --debug.
The engine raises its own ValueError subclasses; the CLI maps those too (see cli/output.py).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # anything not listed below
EXIT_USAGE = 2  # bad flags or arguments (click's own code), bad names or references
EXIT_NOT_FOUND = 3  # no such concept, version, tag, remote or base
EXIT_CONFLICT = 4  # the version already exists, a lock is held, a compare-and-swap kept losing
EXIT_INTEGRITY = 5  # digest mismatch, corrupt or hostile file, failed verify
EXIT_REMOTE = 6  # the remote failed after retries (network, 5xx, permissions)
EXIT_INCOMPATIBLE = 7  # a concept for another base, covariances that differ
EXIT_OFFLINE = 8  # offline mode and the thing is not available locally
EXIT_UNTRUSTED = 9  # a signature check failed under an enforcing trust policy
EXIT_REFUSED = 10  # the remote lacks a capability publishing needs (conditional writes); see --single-writer

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "error",
    EXIT_USAGE: "usage error: bad option, name or reference",
    EXIT_NOT_FOUND: "not found: concept, version, tag, remote or base",
    EXIT_CONFLICT: "conflict: version already exists, or concurrent update kept losing",
    EXIT_INTEGRITY: "integrity: digest mismatch, corrupt or refused file",
    EXIT_REMOTE: "remote failure after retries",
    EXIT_INCOMPATIBLE: "incompatible: concept and base (or covariances) do not match",
    EXIT_OFFLINE: "offline and not available locally",
    EXIT_UNTRUSTED: "untrusted: signature missing or invalid under an enforcing policy",
    EXIT_REFUSED: "refused: the remote lacks conditional writes (see `pfx remote add --single-writer`)",
}


class PfxError(Exception):
    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class LocalWriteError(PfxError):
    """The local disk refused a write (full, file-size limit, read-only, permissions): not retried,
    and not the remote's fault."""

    exit_code = EXIT_ERROR


class UsageError(PfxError):
    exit_code = EXIT_USAGE


class InvalidName(UsageError):
    pass


class NotFound(PfxError):
    exit_code = EXIT_NOT_FOUND


class Conflict(PfxError):
    exit_code = EXIT_CONFLICT


class VersionExists(Conflict):
    pass


class IntegrityError(PfxError):
    exit_code = EXIT_INTEGRITY


class MalformedDocument(IntegrityError):
    """Bytes that are not JSON at all (truncated, empty, cut inside a UTF-8 sequence), as opposed to
    JSON that breaks a rule (duplicate keys, NaN, wrong schema). A store without atomic PUT can show a
    reader a document half-written, so readers of mutable documents retry this one a few times."""


class RemoteError(PfxError):
    exit_code = EXIT_REMOTE


class Incompatible(PfxError):
    exit_code = EXIT_INCOMPATIBLE


class OfflineError(PfxError):
    exit_code = EXIT_OFFLINE


class Untrusted(PfxError):
    exit_code = EXIT_UNTRUSTED


class CapabilityRefused(PfxError):
    """The remote was probed and lacks a feature safe publishing needs (If-None-Match / If-Match);
    not a failure of the remote (that is RemoteError, exit 6) but a refusal by pfx."""

    exit_code = EXIT_REFUSED
