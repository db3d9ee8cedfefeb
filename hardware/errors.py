"""Errors a user can cause, each rendered as one line by the CLI (never a traceback)."""

from __future__ import annotations

from pydantic import ValidationError


class ServesimError(ValueError):
    """A user mistake (bad id, bad field value, model that does not fit): one clear line."""


class UnknownIdError(ServesimError):
    """An id that is not in the catalog; the message lists the known ids."""

    def __init__(self, what: str, value: str, known: list[str]) -> None:
        super().__init__(f"unknown {what} {value!r}; known: {', '.join(sorted(known))}")


class DoesNotFitError(ServesimError):
    """Weights + activations + the minimum KV reserve exceed the usable GPU memory."""


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming the field, the value and what is allowed, from pydantic's first error."""
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if not err["loc"]:  # a check across fields: its message names them
        return f"{source}: {msg}{extra}"
    field = ".".join(str(p) for p in err["loc"])
    if err["type"] == "union_tag_invalid":  # a section's kind/name is unknown: show just that field
        ctx = err["ctx"]
        key = ctx["discriminator"].strip("'")
        return f"{source}: {field}.{key} = {ctx['tag']!r}: allowed: {ctx['expected_tags']}"
    shown = "missing" if err["type"] == "missing" else repr(err.get("input"))
    return f"{source}: {field} = {shown}: {msg}{extra}"
