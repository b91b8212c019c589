"""Request parsing of the web handlers: path segments, query parameters, keys and integers.

Paths and queries are parsed from the raw request target, not from aiohttp's decoded form of
it, so every malformed input is refused the same way: a 400 (`bad`) naming the parameter.
Keys, names, cursors and prefixes are at most 200 characters of `[A-Za-z0-9._:-]`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote_to_bytes

from app.web.errors import HttpError, bad, prefers_html

MAX_KEY_LENGTH = 200
KEY_CHARS = re.compile(r"[A-Za-z0-9._:-]+\Z")
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def decode_component(raw: str, param: str) -> str:
    """A percent-encoded path segment or query item as text; 400 if malformed or not UTF-8."""
    if BAD_ESCAPE.search(raw):
        raise bad(param, "malformed percent-escape")
    # unquote_to_bytes, not unquote: unquote would turn invalid UTF-8 into U+FFFD silently.
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise bad(param, "percent-escapes are not UTF-8") from None


def check_key(value: str, param: str) -> str:
    """`value` if it is a well-formed key (also used for names, cursors and prefixes)."""
    if not value:
        raise bad(param, "empty")
    if len(value) > MAX_KEY_LENGTH:
        raise bad(param, f"longer than {MAX_KEY_LENGTH} characters")
    if CONTROL.search(value):
        raise bad(param, "contains control characters")
    if not KEY_CHARS.match(value):
        raise bad(param, "only the characters A-Z a-z 0-9 . _ : - are allowed")
    return value


def parse_int(value: str, param: str, minimum: int, maximum: int | None, digits: int) -> int:
    """A decimal integer parameter within [minimum, maximum]; 400 otherwise."""
    if not value.isascii() or not value.isdigit():
        raise bad(param, "not a non-negative integer")
    if len(value.lstrip("0")) > digits:
        raise bad(param, "too large")
    number = int(value)
    if number < minimum:
        raise bad(param, f"must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise bad(param, f"must be at most {maximum}")
    return number


def parse_query(raw: str, allowed: Iterable[str]) -> dict[str, str]:
    """The query string as name -> value; 400 on unknown, repeated or undecodable parameters."""
    names = set(allowed)
    out: dict[str, str] = {}
    for item in raw.split("&"):
        if not item:
            continue
        raw_name, _, raw_value = item.partition("=")
        name = decode_component(raw_name.replace("+", " "), "query")
        if name not in names:
            raise bad(name[:40], f"unknown parameter (allowed: {', '.join(sorted(names)) or 'none'})")
        if name in out:
            raise bad(name, "given more than once")
        out[name] = decode_component(raw_value.replace("+", " "), name)
    return out


def path_segments(raw_path: str, prefix: str, names: tuple[str, ...]) -> list[str]:
    """The decoded segments after `prefix` (at most len(names)); trailing slash optional."""
    rest = raw_path[len(prefix):]
    if rest in ("", "/"):
        return []
    if not rest.startswith("/"):
        raise HttpError(404, "not found")
    parts = rest[1:].split("/")
    if parts[-1] == "":
        parts.pop()
    if len(parts) > len(names):
        raise HttpError(404, "not found")
    return [decode_component(part, name) for part, name in zip(parts, names[:len(parts)], strict=True)]


def wants_html(accept: str, query: Mapping[str, str]) -> bool:
    """HTML or JSON: the `format` parameter decides, else the `Accept` header."""
    fmt = query.get("format")
    if fmt is not None:
        if fmt not in ("html", "json"):
            raise bad("format", "must be html or json")
        return fmt == "html"
    return prefers_html(accept)
