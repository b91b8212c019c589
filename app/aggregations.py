"""Aggregations declared beside a model: count by a field, sum by a key, count per time window.

A model lists them in `__aggregations__`; the worker keeps each as a table of its own
(`/tables/<name>/`), maintained by the two idempotent, batched stages of `app.views`:

    class Order(EventedBase):
        __aggregations__ = (
            count_by("orders_by_status", "status"),
            sum_by("customer_orders", key="customer_id", sums={"total_cents": "amount_cents"},
                   split_by="currency", latest={"last_order_at": "created_at"}),
            window_count("orders_per_minute", time="created_at", size=60, keep=3600),
        )

What they express is what Kafka Streams' `groupBy(...).count()`, `.aggregate(...)` with sums
and `windowedBy(TumblingWindows).count()` give its users, over an entity's *current* state
(an update moves a key from one group to another; a delete takes it out), with these limits:
- a value is a function of one entity's latest states: no joins, no filters, no averages
  (keep a sum and a count and divide when reading);
- `count_by`/`sum_by` group by one field (its value as text; a null value is not counted);
- `window_count` counts each key once, in the tumbling window of its `time` field at its first
  event, and a delete does not uncount it (creations per window); all windows of an entity use
  the same `time` field; windows older than `keep` seconds are dropped;
- `latest` keeps the greatest value of a timestamp or integer field among the group's keys.

Every field is checked against the entity's Avro schema before anything runs (`problems`,
called by `app.capture.agreement`): a name that is not a field, a sum of a non-integer field.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from app.views import State, is_int, micros, present_count
from app.wire.schemas import non_null

#: Avro types whose values are integers (a `long` with a timestamp logicalType included).
INTEGER_TYPES = ("int", "long")


def _type_name(avro_type: Any) -> str:
    avro_type = non_null(avro_type)
    if isinstance(avro_type, dict):
        return str(avro_type.get("type"))
    return str(avro_type)


@dataclass(frozen=True)
class KeyRule:
    """Which aggregation keys are possible, from the type of the field they come from."""

    kind: str = "any"  # "any", "integer" or "enum"
    symbols: frozenset[str] = frozenset()

    @classmethod
    def of(cls, avro_type: Any) -> KeyRule:
        avro_type = non_null(avro_type)
        if isinstance(avro_type, dict) and avro_type.get("type") == "enum":
            return cls("enum", frozenset(avro_type["symbols"]))
        if _type_name(avro_type) in INTEGER_TYPES:
            return cls("integer")
        return cls()

    def problem(self, name: str, key: str) -> str | None:
        if self.kind == "integer" and not key.removeprefix("-").isdigit():
            return f"{name} key {key[:40]!r} is not an integer"
        if self.kind == "enum" and key not in self.symbols:
            return f"{name} key {key[:40]!r} is not one of {sorted(self.symbols)}"
        return None


class _Declared:
    """What every declaration shares: checking its fields against the entity's schema."""

    name: str
    keys_rule: KeyRule

    def fields(self) -> dict[str, tuple[str, ...]]:
        """field -> the Avro types it may have (empty: any)."""
        raise NotImplementedError

    def key_field(self) -> str | None:
        return None

    def problems(self, schema_fields: list[dict[str, Any]]) -> list[str]:
        """One line per field this declaration names that the schema's data record cannot give."""
        types = {f["name"]: f["type"] for f in schema_fields}
        out = []
        for name, allowed in self.fields().items():
            if name not in types:
                out.append(f"aggregation {self.name!r}: {name!r} is not a field of the entity's schema "
                           f"(fields: {', '.join(sorted(types))})")
            elif allowed and _type_name(types[name]) not in allowed:
                out.append(f"aggregation {self.name!r}: field {name!r} is {_type_name(types[name])}, "
                           f"not one of {', '.join(allowed)}")
        return out

    def bind(self, schema_fields: list[dict[str, Any]]) -> Any:
        """This declaration checked against the schema, with the key rule its key field's type
        gives (`ValueError` naming the first problem)."""
        problems = self.problems(schema_fields)
        if problems:
            raise ValueError(problems[0])
        key = self.key_field()
        if key is None:
            return self
        types = {f["name"]: f["type"] for f in schema_fields}
        return replace(self, keys_rule=KeyRule.of(types[key]))  # type: ignore[type-var]  # dataclasses.replace on a generic frozen dataclass


class _Counted(_Declared):
    """What the counting declarations share: each part's value is an int, readers see the sum."""

    def problem(self, key: str, value: Any) -> str | None:
        return self.keys_rule.problem(self.name, key) or (
            None if is_int(value) else f"update value {value!r:.60} is not a count of {self.name}")

    def present(self, stored: dict[str, Any]) -> int:
        return present_count(stored)


def _group(state: State | None, key: str) -> str | None:
    if state is None or state.get(key) is None:
        return None
    return str(state[key])


@dataclass(frozen=True)
class CountBy(_Counted):
    """How many of the entity's keys have each value of `field` (`groupBy(field).count()`)."""

    name: str
    field: str
    keys_rule: KeyRule = KeyRule()
    #: Not windowed: no window size, no time field, nothing expires.
    window: ClassVar[None] = None
    time: ClassVar[None] = None
    keep: ClassVar[None] = None

    @property
    def description(self) -> str:
        return f"count per {self.field}"

    def fields(self) -> dict[str, tuple[str, ...]]:
        return {self.field: ()}

    def key_field(self) -> str | None:
        return self.field

    def new(self) -> dict[str, int]:
        return defaultdict(int)

    def apply(self, part: dict[str, int], before: State | None, after: State | None, created: int | None) -> set[str]:
        old, new = _group(before, self.field), _group(after, self.field)
        if old == new:
            return set()  # the key stays in its group: no count changes
        for group, sign in ((old, -1), (new, 1)):
            if group is not None:
                part[group] += sign
        return {g for g in (old, new) if g is not None}

    def keys(self, part: dict[str, int]) -> set[str]:
        return set(part)

    def value(self, part: dict[str, int], key: str) -> int:
        return part.get(key, 0)


@dataclass(frozen=True)
class SumBy(_Declared):
    """Per value of `key`: how many of the entity's keys have it, the sums of `sums`' fields
    (split by the value of `split_by`, e.g. a currency), and the greatest value of `latest`'s."""

    name: str
    key: str
    sums: Mapping[str, str] = field(default_factory=dict)  # output name -> integer field
    split_by: str | None = None
    latest: Mapping[str, str] = field(default_factory=dict)  # output name -> timestamp/integer field
    keys_rule: KeyRule = KeyRule()
    #: Not windowed: no window size, no time field, nothing expires.
    window: ClassVar[None] = None
    time: ClassVar[None] = None
    keep: ClassVar[None] = None

    @property
    def description(self) -> str:
        return f"aggregate per {self.key}"

    def fields(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {self.key: ()}
        if self.split_by is not None:
            out[self.split_by] = ()
        out.update({f: INTEGER_TYPES for f in self.sums.values()})
        out.update({f: INTEGER_TYPES for f in self.latest.values()})
        return out

    def key_field(self) -> str | None:
        return self.key

    def new(self) -> dict[str, dict[str, Any]]:
        return {}

    def _add(self, part: dict[str, dict[str, Any]], group: str, state: State, sign: int) -> None:
        agg = part.setdefault(group, {"count": 0, "sums": {}, "latest": {}})
        agg["count"] += sign
        for out, name in self.sums.items():
            amount = sign * (state.get(name) or 0)
            if self.split_by is None:
                agg["sums"][out] = agg["sums"].get(out, 0) + amount
                continue
            split, totals = str(state.get(self.split_by)), agg["sums"].setdefault(out, {})
            totals[split] = totals.get(split, 0) + amount
            if not totals[split]:
                del totals[split]
        for out, name in self.latest.items():
            if state.get(name) is None:
                continue
            seen = agg["latest"].setdefault(out, [])
            if sign > 0:
                seen.append(micros(state[name]))
            elif micros(state[name]) in seen:
                seen.remove(micros(state[name]))
        if agg["count"] == 0:
            del part[group]

    def apply(self, part: dict[str, dict[str, Any]], before: State | None, after: State | None,
              created: int | None) -> set[str]:
        if before is not None and after is not None and all(before.get(f) == after.get(f) for f in self.fields()):
            return set()  # nothing this aggregation reads changed
        changed = set()
        for state, sign in ((before, -1), (after, 1)):
            group = _group(state, self.key)
            if group is not None:
                self._add(part, group, state, sign)  # type: ignore[arg-type]  # state is not None here: _group returned a group
                changed.add(group)
        return changed

    def keys(self, part: dict[str, dict[str, Any]]) -> set[str]:
        return set(part)

    def value(self, part: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
        agg = part.get(key)
        if agg is None:
            return None  # no keys of the group in this partition
        out: dict[str, Any] = {"count": agg["count"]}
        for name in self.sums:
            total = agg["sums"].get(name, 0 if self.split_by is None else {})
            out[name] = dict(total) if isinstance(total, dict) else total
        for name in self.latest:
            seen = agg["latest"].get(name)
            out[name] = max(seen) if seen else None
        return out

    def problem(self, key: str, value: Any) -> str | None:
        wrong = self.keys_rule.problem(self.name, key)
        if wrong is not None:
            return wrong
        if value is None:
            return None
        ok = isinstance(value, dict) and is_int(value.get("count"))
        for name in self.sums:
            total = value.get(name) if ok else None
            ok = ok and (is_int(total) if self.split_by is None else isinstance(total, dict) and all(
                isinstance(s, str) and is_int(v) for s, v in total.items()))
        for name in self.latest:
            ok = ok and (value.get(name) is None or is_int(value.get(name)))
        return None if ok else f"update value {value!r:.60} is not a value of {self.name}"

    def present(self, stored: dict[str, Any]) -> dict[str, Any] | None:
        count = 0
        sums: dict[str, Any] = {name: 0 if self.split_by is None else {} for name in self.sums}
        latest: dict[str, int | None] = dict.fromkeys(self.latest)
        for part in stored.get("parts", {}).values():
            value = part["value"]
            if value is None:
                continue
            count += value["count"]
            for name in self.sums:
                if self.split_by is None:
                    sums[name] += value[name]
                else:
                    for split, amount in value[name].items():
                        sums[name][split] = sums[name].get(split, 0) + amount
            for name in self.latest:
                seen = latest[name]
                if value[name] is not None:
                    latest[name] = value[name] if seen is None else max(seen, value[name])
        if count == 0:
            return None
        return {"count": count, **sums, **latest}


@dataclass(frozen=True)
class WindowCount(_Counted):
    """How many of the entity's keys were created in each tumbling window of `size` seconds of
    their `time` field, kept `keep` seconds (`windowedBy(TumblingWindows).count()`)."""

    name: str
    time: str
    size: int = 60
    keep: int = 3600
    keys_rule: KeyRule = KeyRule("integer")

    @property
    def window(self) -> int:
        return self.size

    @property
    def description(self) -> str:
        return f"tumbling window {self.size} s, kept {self.keep} s (key: window start, epoch s)"

    def fields(self) -> dict[str, tuple[str, ...]]:
        return {self.time: INTEGER_TYPES}

    def start(self, created: int) -> int:
        """Start (epoch seconds) of the window holding a time in epoch microseconds."""
        seconds = created // 1_000_000
        return seconds - seconds % self.size

    def new(self) -> dict[int, int]:
        return defaultdict(int)

    def apply(self, part: dict[int, int], before: State | None, after: State | None, created: int | None) -> set[str]:
        if created is None:
            return set()  # only a key's first event counts
        window = self.start(created)
        part[window] += 1
        return {str(window)}

    def keys(self, part: dict[int, int]) -> set[str]:
        return {str(w) for w in part}

    def value(self, part: dict[int, int], key: str) -> int:
        return part.get(int(key), 0)


#: Anything `__aggregations__` may hold.
Declared = CountBy | SumBy | WindowCount


def count_by(name: str, field: str) -> CountBy:
    """Table `name`: key = a value of `field`, value = how many keys have it now."""
    return CountBy(name, field)


def sum_by(name: str, key: str, sums: Mapping[str, str] | None = None, split_by: str | None = None,
           latest: Mapping[str, str] | None = None) -> SumBy:
    """Table `name`: key = a value of `key`; value = `count`, each of `sums` (output name ->
    integer field; a `{split value: sum}` object with `split_by`), each of `latest` (output name
    -> the greatest value of a timestamp/integer field)."""
    return SumBy(name, key, dict(sums or {}), split_by, dict(latest or {}))


def window_count(name: str, time: str, size: int = 60, keep: int = 3600) -> WindowCount:
    """Table `name`: key = a window start (epoch s), value = keys created in it (by `time`)."""
    if size <= 0 or keep < size:
        raise ValueError(f"window_count {name!r}: size must be > 0 and keep >= size (got {size}, {keep})")
    return WindowCount(name, time, size, keep)
