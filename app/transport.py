"""A Faust Kafka transport whose worker consumers use our fetch wait instead of Faust's 1500 ms.

Faust hard-codes `fetch_max_wait_ms=1500` for worker consumers. Apache Kafka answers a
waiting fetch as soon as data arrives, so there it only bounds idle polling; Tansu answers
only when the wait expires, so there it is the latency of every hop. The setting
`consumer_fetch_max_wait_ms` replaces it; everything else is Faust's own driver.
"""
from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as driver

from app.settings import Settings


class FetchWaitConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait taken from the app's settings."""

    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when it builds its fetcher in start().
        wait = getattr(self.app, "settings", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait.consumer_fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer


class FetchWaitConsumer(driver.Consumer):
    """Faust's aiokafka consumer using `FetchWaitConsumerThread`."""

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(driver.Transport):
    """Faust's aiokafka transport with `FetchWaitConsumer`."""

    Consumer = FetchWaitConsumer


class App(faust.App):
    """`faust.App` carrying our `Settings` and using `FetchWaitTransport`."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings.app_id, **kwargs)
        self.settings = settings

    def _new_transport(self) -> Any:
        return FetchWaitTransport(self.conf.broker_consumer, self)
