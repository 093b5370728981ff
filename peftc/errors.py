"""Exceptions raised by peftc. Each message names the problem and the fix."""


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""


class RuleError(PeftcError, ValueError):
    """A rule or adapter spec is invalid, matches nothing, or conflicts with another."""


class TraceError(PeftcError, RuntimeError):
    """The model could not be traced with the given inputs."""


class MergeError(PeftcError, RuntimeError):
    """Adapters could not be folded into (or out of) the weights."""
