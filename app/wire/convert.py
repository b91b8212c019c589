"""Converters between schema versions: a chain of small pure steps named from -> to.

A converter names only the data fields whose meaning changed (renamed, split, unit change);
every other field of the target version is carried over by name, as Avro schema resolution
would. `app.wire.compat` checks that each carried field really resolves.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.wire.schemas import load

Data = dict[str, Any]
MAX_EXACT_CENTS = 2**53


class ConversionError(ValueError):
    """An event that cannot be converted to the requested version."""


@dataclass(frozen=True)
class Converter:
    """One step `entity` v`source` -> v`target`; `produces` lists the data fields `step` sets."""

    entity: str
    source: int
    target: int
    produces: frozenset[str]
    step: Callable[[Data], Data]


def orders_v2_to_v1(data: Data) -> Data:
    """v2 -> v1: cents to units, the status enum to a lowercase string, shipping flattened."""
    cents = data["amount_cents"]
    if not isinstance(cents, int):
        raise ConversionError(f"orders v2 -> v1: amount_cents must be an integer, got {cents!r:.60}")
    if abs(cents) > MAX_EXACT_CENTS:
        # v1 carries a double: beyond 2**53 cents the amount would silently change.
        raise ConversionError(f"orders v2 -> v1: amount_cents {cents} cannot be represented exactly "
                              "as a v1 double amount")
    shipping = data.get("shipping")
    return {
        "amount": cents / 100,
        "status": str(data["status"]).lower(),
        "shipping_address": shipping["address"] if shipping else None,
    }


CONVERTERS: dict[tuple[str, int, int], Converter] = {
    ("orders", 2, 1): Converter("orders", 2, 1, frozenset({"amount", "status", "shipping_address"}),
                                orders_v2_to_v1),
}


def chain(entity: str, source: int, target: int,
          converters: dict[tuple[str, int, int], Converter] | None = None) -> list[Converter]:
    """The converters taking `entity` from `source` down to `target`, one version at a time."""
    registry = CONVERTERS if converters is None else converters
    steps = []
    for version in range(source, target, -1 if target < source else 1):
        step = registry.get((entity, version, version + (-1 if target < source else 1)))
        if step is None:
            raise ConversionError(f"no converter for {entity} v{version} -> v{version - 1 if target < source else version + 1}")
        steps.append(step)
    return steps


def convert_data(entity: str, data: Data, source: int, target: int) -> Data:
    """The entity state `data` (version `source`) as version `target`."""
    for step in chain(entity, source, target):
        fields = load(entity, step.target).data_fields()
        carried = {f["name"]: data[f["name"]] for f in fields
                   if f["name"] not in step.produces and f["name"] in data}
        try:
            changed = step.step(data)
        except ConversionError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConversionError(f"{entity} v{step.source} -> v{step.target}: {type(exc).__name__}: {exc}") from exc
        data = {**carried, **changed}
    return data


def convert_record(record: Data, target: int) -> Data:
    """A full event record (envelope + data) as `target`; same event id, key and sequence."""
    source = record["schema_version"]
    data = record["data"]
    return {
        **record,
        "schema_version": target,
        "data": None if data is None else convert_data(record["entity"], data, source, target),
    }
