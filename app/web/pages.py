"""The HTML pages of `/tables/` and `/tables/<name>/`, for browsers.

Each page is complete in itself (inline CSS, nothing fetched from elsewhere) and escapes every
value it shows. The pages render the same body the JSON answer carries.
"""
from __future__ import annotations

import html
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header a { color: #9ecbff; text-decoration: none; }
header p { margin: 4px 0 0; color: #d0d7de; font-size: 13px; }
main { padding: 16px 24px 32px; }
.meta { color: #57606a; margin: 0 0 12px; }
form { display: flex; gap: 8px; align-items: center; margin: 0 0 12px; flex-wrap: wrap; }
input { font: inherit; padding: 4px 8px; border: 1px solid #d0d7de; border-radius: 6px; }
button { font: inherit; padding: 4px 12px; border: 1px solid #1f883d; border-radius: 6px;
         background: #1f883d; color: #fff; cursor: pointer; }
table { border-collapse: collapse; background: #fff; border: 1px solid #d0d7de; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
td.key, td.num, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.num { text-align: right; }
td.ts { white-space: nowrap; }
.muted { color: #8c959f; }
nav { margin-top: 12px; display: flex; gap: 16px; }
nav a, td a { color: #0969da; text-decoration: none; }
.empty { padding: 24px; text-align: center; color: #57606a; background: #fff; border: 1px solid #d0d7de; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def page_html(title: str, subtitle: str, body: str) -> str:
    """A complete page: inline CSS only, nothing fetched from elsewhere."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f'<header><h1><a href="/tables/">tables</a> / {esc(title)}</h1><p>{esc(subtitle)}</p>'
            f'<nav><a href="/status">status</a> · <a href="/tables/">tables</a></nav></header>'
            f"<main>{body}</main></body></html>")


def cell(name: str, value: Any) -> str:
    """One table cell: numbers right-aligned, `*_at` microsecond timestamps as UTC times."""
    if value is None:
        return '<td class="muted">—</td>'
    if isinstance(value, bool):
        return f"<td>{esc(value)}</td>"
    if isinstance(value, int) and name.endswith("_at") and value > 10 ** 14:
        try:
            shown = datetime.fromtimestamp(value / 1_000_000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f'<td class="ts" title="{esc(value)}">{esc(shown)}</td>'
        except (OverflowError, OSError, ValueError):
            pass
    if isinstance(value, (int, float)):
        return f'<td class="num">{esc(value)}</td>'
    if isinstance(value, dict):
        # Nested records (an order's shipping) as "field: value" lines; JSON for deeper values.
        lines = [f'<span class="muted">{esc(k)}:</span> {esc(v if isinstance(v, (str, int, float)) else json.dumps(v))}'
                 for k, v in value.items() if v is not None]
        if not lines:
            return '<td class="muted">—</td>'
        return f"<td>{'<br>'.join(lines)}</td>"
    if isinstance(value, list):
        return f"<td><code>{esc(json.dumps(value))}</code></td>"
    return f"<td>{esc(value)}</td>"


def render_index(body: Mapping[str, Any]) -> str:
    """The HTML of `/tables/`."""
    rows = []
    for table in body["tables"]:
        parts = table["partitions"]
        rows.append(
            f'<tr><td class="key"><a href="{esc(table["url"])}">{esc(table["name"])}</a></td>'
            f'<td>{esc(table["kind"])}</td><td class="num">{esc(table["keys"])}</td>'
            f'<td class="key">{esc(", ".join(map(str, parts["active"])) or "—")}</td>'
            f'<td class="key">{esc(", ".join(map(str, parts["standby"])) or "—")}</td></tr>')
    content = ("<table><thead><tr><th>table</th><th>kind</th><th>keys</th><th>active partitions</th>"
               f"<th>standby partitions</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return page_html("all", f"materialized views on worker {body['worker']}", content)


def render_listing(body: Mapping[str, Any], windowed: bool) -> str:
    """The HTML of `/tables/<name>/`."""
    name, items = body["table"], body["items"]
    values = [item["value"] for item in items]
    columns: list[str] = []
    if values and all(isinstance(v, dict) for v in values):
        for value in values:
            columns.extend(k for k in value if k not in columns)
    head = ["key"] + (["window start", "window end"] if windowed else []) + (columns or ["value"])
    rows = []
    for item in items:
        cells = [f'<td class="key">{esc(item["key"])}</td>']
        if windowed:
            window = item.get("window") or {}
            cells += [f"<td>{esc(window.get('start', '—'))}</td>", f"<td>{esc(window.get('end', '—'))}</td>"]
        if columns:
            cells += [cell(c, item["value"].get(c)) for c in columns]
        else:
            cells.append(cell("value", item["value"]))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    parts = body["partitions"]
    meta = (f'<p class="meta">{len(items)} item(s) on this page, sorted by key · active partitions '
            f'{esc(", ".join(map(str, parts["active"])) or "none")} · standby '
            f'{esc(", ".join(map(str, parts["standby"])) or "none")} · worker {esc(body["worker"])}</p>')
    form = (f'<form method="get" action="/tables/{esc(name)}/">'
            f'<label>key prefix <input name="prefix" value="{esc(body["prefix"] or "")}" size="16"></label>'
            f'<label>per page <input name="limit" value="{esc(body["limit"])}" size="5"></label>'
            f"<button type=\"submit\">show</button></form>")
    if rows:
        grid = (f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")
    else:
        grid = '<div class="empty">no items</div>'
    links = [f'<a href="/tables/{esc(name)}/?{esc(query(body, after=None))}">first page</a>']
    if body["next"] is not None:
        links.append(f'<a href="/tables/{esc(name)}/?{esc(query(body, after=body["next"]))}">next page →</a>')
    links.append(f'<a href="/tables/{esc(name)}/?{esc(query(body, after=body["after"], fmt="json"))}">JSON</a>')
    return page_html(name, body["kind"], f"{meta}{form}{grid}<nav>{''.join(links)}</nav>")


def query(body: Mapping[str, Any], after: str | None, fmt: str | None = None) -> str:
    """The query string of a listing link (values are already restricted to safe characters)."""
    params = [f"limit={body['limit']}"]
    if body["prefix"]:
        params.append(f"prefix={body['prefix']}")
    if after:
        params.append(f"after={after}")
    if fmt:
        params.append(f"format={fmt}")
    return "&".join(params)
