"""`/status`: one page with a live chart of events/s per stage and the outbox lag, and its JSON.

The worker samples its counters every second (`StatusHistory`), and `/status` carries the
current figures and that history in its first response (`page`: the `/status.json` body inline),
so the chart is full as soon as the page paints; the page then re-reads `/status.json` every
second. Everything is inline: the page loads nothing but `/status.json`.
"""
from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mode import Service

from app.ops.metrics import STAGES, Sources
from app.ops.offsets import agent_lag, agent_topics, partition_offsets

#: Seconds of history the page shows.
HISTORY = 120


class StatusHistory(Service):
    """Samples events/s per stage and the outbox lag once a second."""

    def __init__(self, sources: Sources, interval: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources = sources
        self.interval = interval
        self.samples: deque[dict[str, float]] = deque(maxlen=HISTORY)
        self._last: tuple[float, dict[str, int]] | None = None

    @Service.task
    async def _sample(self) -> None:
        while not self.should_stop:
            self.sample()
            await self.sleep(self.interval)

    def sample(self) -> None:
        """Add one sample: rates since the previous one."""
        now, totals = time.time(), self.sources.stage_totals()
        if self._last is not None:
            then, before = self._last
            elapsed = max(now - then, 1e-6)
            point: dict[str, float] = {"t": round(now, 3)}
            for stage in STAGES:
                point[stage] = round(max(0, totals[stage] - before[stage]) / elapsed, 2)
            relay = self.sources.relay
            point["outbox_rows"] = relay.stats.pending_rows if relay is not None else 0
            point["outbox_seconds"] = round(relay.stats.oldest_seconds, 3) if relay is not None else 0.0
            self.samples.append(point)
        self._last = (now, totals)


def status_body(sources: Sources, history: StatusHistory, states: Callable[[], dict[str, str]]) -> dict[str, Any]:
    """What `/status.json` answers: current counters, agents, readiness and the recent samples."""
    relay = sources.relay
    reasons = sources.not_ready()
    agent_states = states()
    stuck = sources.stuck()
    running = sources.running()
    topics = agent_topics(sources.app)
    offsets = partition_offsets(sources.app, set().union(*topics.values()) if topics else ())
    agents = {}
    for name in sorted(sources.app.agents):
        p = sources.progress.progress(name)
        state = agent_states.get(name) or ("running" if name in running else "dead")
        agents[name] = {"state": "failing" if p.failing else state, "processed": p.processed,
                        "in_flight": p.in_flight, "lag": agent_lag(p, topics.get(name, set()), offsets),
                        "errors": p.errors, "restarts": sum(p.restarts.values()),
                        "stuck": stuck.get(name, "")}
    return {
        "time": time.time(),
        "ready": not reasons,
        "reasons": reasons,
        "counters": sources.stage_totals(),
        "outbox": {
            "rows": relay.stats.pending_rows if relay is not None else 0,
            "seconds": relay.stats.oldest_seconds if relay is not None else 0.0,
            "relay_active": bool(relay and relay.stats.active),
            "relay_connected": bool(relay and relay.stats.connected),
        },
        "dead_letters": sum(sources.dead_letters().values()),
        "tables": sources.table_keys(),
        "agents": agents,
        "stages": list(STAGES),
        "history": list(history.samples),
    }


PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>worker status</title>
<style>
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 14px 24px; display: flex; align-items: center; gap: 16px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header a { color: #9ecbff; text-decoration: none; }
#badge { padding: 2px 10px; border-radius: 12px; font-weight: 600; font-size: 13px; background: #57606a; }
#badge.ready { background: #1f883d; } #badge.notready { background: #cf222e; }
#updated { color: #d0d7de; font-size: 13px; margin-left: auto; }
main { padding: 16px 24px 32px; display: grid; gap: 16px; }
.panel { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 12px 16px; }
.panel h2 { margin: 0 0 8px; font-size: 15px; }
#reasons { color: #cf222e; margin: 0; padding-left: 18px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.card .v { font: 600 22px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.card .k { color: #57606a; font-size: 12px; }
.legend { display: flex; gap: 18px; flex-wrap: wrap; margin: 0 0 6px; font-size: 13px; }
.legend span i { display: inline-block; width: 12px; height: 3px; vertical-align: middle; margin-right: 5px; }
svg { width: 100%; height: auto; display: block; }
svg text { font: 11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill: #57606a; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #eaeef2; }
td.num, th.num { text-align: right; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.st-running { color: #1a7f37; } .st-stalled, .st-dead, .st-failing, .st-stuck { color: #cf222e; font-weight: 600; }
</style></head><body>
<header><h1>worker status</h1><span id="badge">…</span>
<a href="/metrics">metrics</a><a href="/tables/">tables</a><span id="updated">waiting for data</span></header>
<script id="initial" type="application/json">__INITIAL__</script>
<main>
<ul id="reasons"></ul>
<div class="cards" id="cards"></div>
<div class="panel"><h2>events per second by stage, and outbox lag (last 2 minutes)</h2>
<div class="legend" id="legend"></div>
<svg id="chart" viewBox="0 0 1100 300" preserveAspectRatio="none" data-points="0" role="img"
     aria-label="events per second per stage and outbox lag"></svg></div>
<div class="panel"><h2>agents</h2><table><thead><tr><th>agent</th><th>state</th><th class="num">processed</th>
<th class="num">in flight</th><th class="num">lag</th><th class="num">errors</th>
<th class="num">restarts</th></tr></thead>
<tbody id="agents"></tbody></table></div>
</main>
<script>
"use strict";
const SERIES = [
  ["relay", "relay published", "#0969da"], ["downconvert", "down-conversion", "#8250df"],
  ["views", "views", "#1a7f37"], ["cache", "cache", "#bf8700"]];
const LAG = ["outbox_rows", "outbox lag (rows, right axis)", "#cf222e"];
const W = 1100, H = 300, L = 56, R = 60, T = 10, B = 26, SPAN = 120;
const NS = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function nice(v) {
  // The smallest 4 x {1, 2, 5} x 10^n at or above v (at least 4): four whole-number grid steps.
  const step = Math.max(v, 4) / 4, p = Math.pow(10, Math.floor(Math.log10(step))), m = step / p;
  return 4 * (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}
function fmt(v) { return v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k" : String(Math.round(v * 10) / 10); }

function draw(history, now) {
  const svg = document.getElementById("chart");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const x = t => L + (W - L - R) * (1 - Math.min(SPAN, Math.max(0, now - t)) / SPAN);
  let top = 0, lagTop = 0;
  for (const p of history) {
    for (const [k] of SERIES) top = Math.max(top, p[k]);
    lagTop = Math.max(lagTop, p[LAG[0]]);
  }
  top = nice(top); lagTop = nice(lagTop);
  const y = v => T + (H - T - B) * (1 - v / top), yl = v => T + (H - T - B) * (1 - v / lagTop);
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4, yy = y(v);
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: yy, y2: yy, stroke: "#eaeef2"}));
    svg.appendChild(el("text", {x: L - 6, y: yy + 4, "text-anchor": "end"}, fmt(v)));
    svg.appendChild(el("text", {x: W - R + 6, y: yl(lagTop * i / 4) + 4, fill: LAG[2]}, fmt(lagTop * i / 4)));
  }
  for (let s = 0; s <= SPAN; s += 30) {
    svg.appendChild(el("text", {x: x(now - s), y: H - 8, "text-anchor": "middle"}, s ? "-" + s + "s" : "now"));
  }
  const lagPts = history.map(p => x(p.t).toFixed(1) + "," + yl(p[LAG[0]]).toFixed(1));
  if (lagPts.length) {
    const area = [x(history[0].t).toFixed(1) + "," + yl(0), ...lagPts,
                  x(history[history.length - 1].t).toFixed(1) + "," + yl(0)];
    svg.appendChild(el("polygon", {points: area.join(" "), fill: LAG[2], "fill-opacity": "0.10",
                                   stroke: LAG[2], "stroke-dasharray": "4 3", "data-series": LAG[0]}));
  }
  for (const [k, , color] of SERIES) {
    const pts = history.map(p => x(p.t).toFixed(1) + "," + y(p[k]).toFixed(1));
    svg.appendChild(el("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2,
                                    "stroke-linejoin": "round", "data-series": k}));
    const last = history[history.length - 1];
    if (last) svg.appendChild(el("circle", {cx: x(last.t), cy: y(last[k]), r: 3, fill: color, "data-series": k}));
  }
  let peak = 0;
  for (const p of history) for (const [k] of SERIES) peak = Math.max(peak, p[k]);
  svg.setAttribute("data-points", String(history.length));
  svg.setAttribute("data-peak", String(peak));
  svg.setAttribute("data-zero", y(0).toFixed(1));
}

function render(s) {
  const badge = document.getElementById("badge");
  badge.textContent = s.ready ? "ready" : "not ready";
  badge.className = s.ready ? "ready" : "notready";
  const reasons = document.getElementById("reasons");
  reasons.replaceChildren(...s.reasons.map(r => Object.assign(document.createElement("li"), {textContent: r})));
  const last = s.history[s.history.length - 1] || {};
  const recent = s.history.slice(-5), avg = k => recent.reduce((a, p) => a + p[k], 0) / (recent.length || 1);
  const cards = [["relay", "published", s.counters.relay]];
  for (const [k, label] of SERIES) cards.push([label, "events/s, last 5 s", avg(k)]);
  cards.push(["outbox lag", "rows", s.outbox.rows], ["outbox lag", "oldest, s", s.outbox.seconds.toFixed(1)],
             ["dead letters", "total", s.dead_letters]);
  document.getElementById("cards").replaceChildren(...cards.map(([k, sub, v]) => {
    const d = document.createElement("div"); d.className = "card";
    d.innerHTML = '<div class="v"></div><div class="k"></div>';
    d.firstChild.textContent = typeof v === "number" ? fmt(v) : v;
    d.lastChild.textContent = k + " · " + sub;
    return d;
  }));
  const legend = document.getElementById("legend");
  legend.replaceChildren(...[...SERIES, LAG].map(([k, label, color]) => {
    const e = document.createElement("span");
    e.innerHTML = '<i></i>'; e.firstChild.style.background = color;
    e.appendChild(document.createTextNode(label + ": " + fmt(last[k] || 0)));
    return e;
  }));
  document.getElementById("agents").replaceChildren(...Object.entries(s.agents).map(([name, a]) => {
    const tr = document.createElement("tr");
    for (const [v, cls] of [[name, ""], [a.state, "st-" + a.state], [a.processed, "num"], [a.in_flight, "num"],
                            [a.lag, "num"], [a.errors, "num"], [a.restarts, "num"]]) {
      const td = document.createElement("td"); td.textContent = v; if (cls) td.className = cls; tr.appendChild(td);
    }
    if (a.stuck) tr.children[1].title = a.stuck;
    return tr;
  }));
  draw(s.history, s.time);
  document.getElementById("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
}

async function refresh() {
  try {
    const response = await fetch("/status.json", {cache: "no-store", headers: {Accept: "application/json"}});
    if (response.ok) render(await response.json());
    else document.getElementById("updated").textContent = "status.json answered " + response.status;
  } catch (e) {
    document.getElementById("updated").textContent = "worker unreachable";
  }
}
// The first response carries the figures: paint them now, then keep them fresh.
render(JSON.parse(document.getElementById("initial").textContent));
setInterval(refresh, 1000);
</script></body></html>
"""


def page(body: dict[str, Any]) -> str:
    """The status page with `body` (what `/status.json` answers now) inline, painted as it loads."""
    # In a <script> element only "</" (and "<!--") could end it early: no "<" survives as such.
    return PAGE.replace("__INITIAL__", json.dumps(body, separators=(",", ":")).replace("<", "\\u003c"))
