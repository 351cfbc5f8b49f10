"""Engine errors a user can cause. Each carries the CLI exit code it maps to (registry/errors.py table)."""


class EngineError(ValueError):
    exit_code = 1


class BaseNotAvailable(EngineError):
    """A base that cannot be loaded here (offline, missing tokenizer, unknown id)."""

    exit_code = 3


class BadInput(EngineError):
    """Photos, superclass, prompt or option values that cannot be used."""

    exit_code = 2


class IncompatibleConcepts(EngineError):
    """Concepts that cannot be composed (different covariance, dependent target inputs, clashing tokens)."""

    exit_code = 7
