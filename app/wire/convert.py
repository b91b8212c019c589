"""Converters between schema versions: a chain of small pure steps named from -> to.

A converter names only the data fields whose meaning changed (renamed, split, unit change);
every other field of the target version is carried over by name, as Avro schema resolution
would. `app.wire.compat` checks that each carried field really resolves.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.errors import EventsError
from app.wire.schemas import load

Data = dict[str, Any]


class ConversionError(EventsError, ValueError):
    """An event that cannot be converted to the requested version."""


@dataclass(frozen=True)
class Converter:
    """One step `entity` v`source` -> v`target`; `produces` lists the data fields `step` sets."""

    entity: str
    source: int
    target: int
    produces: frozenset[str]
    step: Callable[[Data], Data]


#: (entity, from, to) -> its step; each model module registers its own with `converter`
#: (`models/order.py` holds `orders_v2_to_v1`, beside `Order`).
CONVERTERS: dict[tuple[str, int, int], Converter] = {}


def converter(entity: str, source: int, target: int, *, produces: set[str]
              ) -> Callable[[Callable[[Data], Data]], Callable[[Data], Data]]:
    """Register the decorated function as the step `entity` v`source` -> v`target`, which sets
    the data fields `produces` (every other field of the target is carried over by name)."""
    def register(step: Callable[[Data], Data]) -> Callable[[Data], Data]:
        key = (entity, source, target)
        if key in CONVERTERS and CONVERTERS[key].step is not step:
            raise ValueError(f"two converters for {entity} v{source} -> v{target}")
        CONVERTERS[key] = Converter(entity, source, target, frozenset(produces), step)
        return step
    return register


def chain(entity: str, source: int, target: int,
          converters: dict[tuple[str, int, int], Converter] | None = None) -> list[Converter]:
    """The converters taking `entity` from `source` down to `target`, one version at a time."""
    registry = CONVERTERS if converters is None else converters
    steps = []
    for version in range(source, target, -1 if target < source else 1):
        step = registry.get((entity, version, version + (-1 if target < source else 1)))
        if step is None:
            wanted = version - 1 if target < source else version + 1
            raise ConversionError(f"no converter for {entity} v{version} -> v{wanted}")
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
