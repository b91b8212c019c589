"""The inbox consumer's Prometheus families (`mse_inbox_*`), read from its live stats at scrape time."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.inbox.consumer import Inbox

#: InboxStats counter -> (metric name, help).
COUNTERS = {
    "applied": ("mse_inbox_applied", "Events the consumer's handler applied (committed)."),
    "skipped_duplicate": ("mse_inbox_skipped_duplicate", "Redelivered events skipped: their id was applied."),
    "skipped_old": ("mse_inbox_skipped_old", "Events skipped: at or below the last sequence applied for their key."),
    "gaps": ("mse_inbox_gaps", "Events whose key skipped a sequence number since the last applied."),
    "dead_lettered": ("mse_inbox_dead_letters", "Events dead-lettered (undecodable, or the handler kept failing)."),
    "handler_errors": ("mse_inbox_handler_errors", "Failed handler attempts (each retried, then dead-lettered)."),
}


class InboxCollector(Collector):
    """Every `mse_inbox_*` family of the consumers given, labelled by consumer."""

    def __init__(self, *inboxes: Inbox) -> None:
        self.inboxes = inboxes

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read the live stats."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The current value of every inbox metric."""
        for attribute, (name, doc) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["consumer"])
            for inbox in self.inboxes:
                family.add_metric([inbox.name], getattr(inbox.stats, attribute))
            yield family
        lag = GaugeMetricFamily("mse_inbox_lag_messages", "Messages not applied yet per input partition "
                                "(high watermark of the last fetch - position).", labels=["consumer", "partition"])
        connected = GaugeMetricFamily("mse_inbox_connected", "1 while the database and the broker answer.",
                                      labels=["consumer"])
        for inbox in self.inboxes:
            for partition, messages in sorted(inbox.stats.lag.items()):
                lag.add_metric([inbox.name, partition], messages)
            connected.add_metric([inbox.name], int(inbox.stats.connected))
        yield lag
        yield connected
