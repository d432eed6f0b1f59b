"""The parameters of ``/api/v1`` operations: what each one is (:class:`Param`, which also
drives the OpenAPI document) and how a request's path, query and JSON body become the values
an operation builds its Admin request from. Anything that does not fit is a
:class:`BadRequest` naming the parameter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
from aiohttp import web

__all__ = ["BadRequest", "Kind", "Param", "Where", "request_values"]

Kind = Literal["string", "integer", "number", "boolean", "strings", "object"]
Where = Literal["path", "query", "body"]


class BadRequest(Exception):
    """A parameter the API cannot turn into a request: ``400`` with this sentence."""


@attrs.frozen(kw_only=True)
class Param:
    name: str
    kind: Kind
    where: Where
    description: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


_TRUE: Final = {"true": True, "1": True, "false": False, "0": False}


def _from_text(param: Param, text: str) -> Any:
    where = f"{param.where} parameter {param.name!r}"
    if param.kind == "string":
        return text
    if param.kind == "boolean":
        if text.lower() not in _TRUE:
            raise BadRequest(f"{where} must be true or false, not {text!r}")
        return _TRUE[text.lower()]
    if param.kind == "integer":
        try:
            value: Any = int(text)
        except ValueError:
            raise BadRequest(f"{where} must be a whole number, not {text!r}") from None
        return _bounded(param, value)
    raise AssertionError(f"{param.kind} in {param.where}")  # pragma: no cover


def _bounded(param: Param, value: float) -> float:
    low, high = param.minimum, param.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise BadRequest(f"{param.where} field {param.name!r} must be {span}, not {value!r}")
    return value


def _from_json(param: Param, value: Any) -> Any:
    where = f"body field {param.name!r}"
    kind = param.kind
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return _bounded(param, value)
    if (
        kind == "number"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ):
        return _bounded(param, float(value))
    if kind == "strings" and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    if kind == "object" and isinstance(value, dict):
        return value
    wanted = {
        "string": "a string",
        "boolean": "true or false",
        "integer": "a whole number",
        "number": "a number",
        "strings": "a list of strings",
        "object": "a JSON object",
    }[kind]
    raise BadRequest(f"{where} must be {wanted}")


async def request_values(params: tuple[Param, ...], request: web.Request) -> dict[str, Any]:
    """The values of ``params`` in ``request``, checked against their kinds and bounds."""
    out: dict[str, Any] = {}
    body_params = [p for p in params if p.where == "body"]
    body: Mapping[str, Any] = {}
    if body_params:
        raw = await request.read()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise BadRequest("the request body must be a JSON object")
            known = {p.name for p in body_params}
            unknown = sorted(set(parsed) - known)
            if unknown:
                raise BadRequest(
                    f"unknown body field {unknown[0]!r} (known: {', '.join(sorted(known))})"
                )
            body = parsed
    for param in params:
        if param.where == "path":
            out[param.name] = request.match_info[param.name]
        elif param.where == "query":
            values = request.query.getall(param.name, [])
            if len(values) > 1:
                raise BadRequest(f"query parameter {param.name!r} is given more than once")
            if values:
                out[param.name] = _from_text(param, values[0])
        elif param.name in body and body[param.name] is not None:
            out[param.name] = _from_json(param, body[param.name])
        if param.required and param.name not in out:
            raise BadRequest(f"{param.where} field {param.name!r} is required")
    return out
