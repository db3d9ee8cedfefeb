"""Errors a user can cause, each rendered as one line by the CLI (never a traceback)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


class ServesimError(ValueError):
    """A user mistake (bad id, bad field value, model that does not fit): one clear line."""


class UnknownIdError(ServesimError):
    """An id that is not in the catalog; the message lists the known ids."""

    def __init__(self, what: str, value: str, known: list[str]) -> None:
        super().__init__(f"unknown {what} {value!r}; known: {', '.join(sorted(known))}")


class DoesNotFitError(ServesimError):
    """Weights + activations + the minimum KV reserve exceed the usable GPU memory."""


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the (nested) model that `loc` (a pydantic error location, without its last part)
    points into, following optional, list and dict fields and tagged unions; None where it cannot tell (it
    never raises: a message without the allowed keys is better than a traceback)."""
    try:
        return _walk(model, loc)
    except Exception:  # noqa: BLE001
        return None


def _walk(model: Any, loc: tuple[Any, ...]) -> list[str] | None:
    node: Any = model
    for part in loc:
        while True:  # unwrap Optional / Annotated / list[...] / dict[..., ...] down to a model or a union
            origin = typing.get_origin(node)
            if origin is typing.Annotated:
                node = typing.get_args(node)[0]
            elif origin in (typing.Union, types.UnionType):
                members = [a for a in typing.get_args(node) if a is not type(None)]
                if len(members) == 1:
                    node = members[0]
                    continue
                tagged = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                          and any(f.default == part for f in m.model_fields.values())]
                if not tagged:
                    return None
                node = tagged[0]
                break
            else:
                break
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part in node.model_fields:
                node = node.model_fields[part].annotation
            elif not any(f.default == part for f in node.model_fields.values()):  # not a union's tag in the loc
                return None
        elif typing.get_origin(node) in (list, tuple) and isinstance(part, int):
            node = typing.get_args(node)[0]
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return None
    while typing.get_origin(node) in (typing.Union, types.UnionType, typing.Annotated):
        members = [a for a in typing.get_args(node) if a is not type(None)]
        if len(members) != 1 and typing.get_origin(node) is not typing.Annotated:
            return None
        node = members[0]
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return None


MAX_ERRORS_SHOWN = 20


def describe_validation_error(exc: ValidationError, source: str, model: Any = None) -> str:
    """One line per pydantic error (at most `MAX_ERRORS_SHOWN`), each naming the field, the value and what is
    allowed; an unknown key of `model` (the validated class) gets the allowed keys and the closest one ("did
    you mean")."""
    fields: dict[tuple[Any, ...], list[Any]] = {}  # a union's members fail one by one: one field, one line
    for err in exc.errors():
        loc = tuple(err["loc"])
        while loc and _is_union_member(loc[-1]):
            loc = loc[:-1]
        # a section's required fields, all missing (a kind set without its fields): one line for the section
        key = ("missing", loc[:-1]) if loc and err["type"] == "missing" else loc
        fields.setdefault(key, []).append({**err, "loc": loc})
    lines = []
    for errs in list(fields.values())[:MAX_ERRORS_SHOWN]:
        if len(errs) > 1 and all(e["type"] == "missing" for e in errs):
            names = ", ".join(str(e["loc"][-1]) for e in errs)
            lines.append(_describe({**errs[0], "loc": (*errs[0]["loc"][:-1], f"{{{names}}}")}, source, model))
            continue
        line = _describe(errs[0], source, model)
        lines.append("; or ".join([line] + [_message(e) for e in errs[1:]]))
    if len(fields) > MAX_ERRORS_SHOWN:
        lines.append(f"{source}: ... and {len(fields) - MAX_ERRORS_SHOWN} more errors")
    return "\n".join(lines)


def _is_union_member(part: Any) -> bool:
    """Whether a pydantic error location part names a union member's type ('bool', "literal['a','b']",
    'constrained-float') rather than a field (snake_case)."""
    return isinstance(part, str) and ("[" in part or "-" in part  # literal['a'], constrained-float: no field names
                                      or part in ("bool", "int", "float", "str", "none"))


def _message(err: Any) -> str:
    return err["msg"].removeprefix("Value error, ")


def _describe(err: Any, source: str, model: Any) -> str:
    msg = _message(err)
    if err["type"] == "extra_forbidden" and model is not None:
        allowed = _fields_at(model, tuple(err["loc"][:-1]))
        if allowed:
            close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown key{guess}; allowed: {', '.join(allowed)}"
    if not err["loc"]:  # a check across fields: its message names them
        return f"{source}: {msg}"
    field = ".".join(str(p) for p in err["loc"])
    if err["type"] == "union_tag_invalid":  # a section's kind/name is unknown: show just that field
        ctx = err["ctx"]
        key = ctx["discriminator"].strip("'")
        return f"{source}: {field}.{key} = {ctx['tag']!r}: allowed: {ctx['expected_tags']}"
    shown = "missing" if err["type"] == "missing" else repr(err.get("input"))
    return f"{source}: {field} = {shown}: {msg}"
