"""Exceptions raised by peftc. Each message names the problem and the fix."""


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""


class RuleError(PeftcError, ValueError):
    """A rule or adapter spec is invalid, matches nothing, or conflicts with another."""


class CapacityError(RuleError):
    """An adapter doesn't fit what the compiled graphs hold for it: the slots and rank of a
    :class:`peftc.Reserve`, or the adapter a hot-swap replaces."""


class TraceError(PeftcError, RuntimeError):
    """The model could not be traced with the given inputs."""


class MergeError(PeftcError, RuntimeError):
    """Adapters could not be folded into (or out of) the weights."""


class QuantizationError(PeftcError, ValueError):
    """A quantize spec, or a weight, that bitsandbytes' 4-bit storage can't take."""


def first_line(e: BaseException, limit: int = 400) -> str:
    """The first non-blank line of ``e``'s message, cut to ``limit`` characters; its type name if blank.

    For quoting another library's exception inside a one-line peftc message.
    """
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    return line[:limit] if line else type(e).__name__
