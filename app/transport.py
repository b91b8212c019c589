"""A Faust Kafka transport whose worker consumers use our fetch wait and true end offsets.

Faust hard-codes `fetch_max_wait_ms=1500` for worker consumers. Apache Kafka answers a
waiting fetch as soon as data arrives, so there it only bounds idle polling; Tansu answers
only when the wait expires, so there it is the latency of every hop. The setting
`consumer_fetch_max_wait_ms` replaces it. The end offsets Faust recovers tables up to are
corrected with a fetch (Tansu's are short by up to a batch). Everything else is Faust's
own driver.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiokafka
import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.tuples import ack_lock

from app.faust_compat import forget_unacked, replace_read_offsets, set_fetch_max_wait
from app.web.http import Limits, guard
from app.retries import Retries
from app.settings import Settings
from app.kafka import fetched_end_offsets


class FetchWaitConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait taken from the app's settings."""

    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "settings", None)
        if wait is not None:
            set_fetch_max_wait(consumer, wait.consumer_fetch_max_wait_ms)
        return consumer


    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        # Faust ends table recovery at these offsets. Tansu's answer is the start of the last
        # record batch, so recovery stopped short and a table could miss the changelog's
        # last writes for good (the fault-injection suite saw an aggregate one off after a
        # takeover): correct it with a fetch (app.kafka.fetched_end_offsets).
        reported = await super()._highwaters(partitions)
        settings: Settings | None = getattr(self.app, "settings", None)
        if settings is None or self.consumer.in_transaction:
            return reported
        by_kafka_tp = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
        ends = await fetched_end_offsets(settings.bootstrap_servers,
                                         {k: reported[tp] for k, tp in by_kafka_tp.items()})
        return {by_kafka_tp[k]: end for k, end in ends.items()}


class _ReadOffsets(defaultdict[TP, "int | None"]):
    """`Consumer._read_offset`, refusing the one write that comes from before a rebalance.

    Faust's drain loop hands a fetched message to the streams (`await callback(message)`) and
    then records its offset as read. A rebalance can run while it waits: the consumer seeks
    back to the committed offset and resets the read offsets to it, and then the loop records
    the old message's offset, higher than that. Every message fetched again between the two
    is then dropped as already read, never processed, never acked, and the commit moves past
    them (Faust commits the first consecutive run of acked offsets): the fault-injection
    suite's storm lost a few events on `orders-v1` and the views that way. The write is
    refused when the message it is for was fetched in an earlier generation.
    """

    def __init__(self, consumer: "FetchWaitConsumer") -> None:
        super().__init__(lambda: None)
        self._consumer = consumer

    def __setitem__(self, tp: TP, offset: "int | None") -> None:
        message = self._consumer.delivering
        if (message is not None and offset is not None and message.tp == tp and message.offset == offset
                and message.generation_id != self._consumer.app.consumer_generation_id):
            return
        super().__setitem__(tp, offset)


class FetchWaitConsumer(driver.Consumer):
    """Faust's aiokafka consumer using `FetchWaitConsumerThread`, recording only real acks
    and only the read offsets of this generation's messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The message the drain loop is handing to the streams now (see `_ReadOffsets`).
        self.delivering: Message | None = None
        replace_read_offsets(self, _ReadOffsets(self))
        deliver = self.callback

        def callback(message: Message) -> Any:
            # Plain function: the message is noted before the drain loop awaits its delivery.
            self.delivering = message
            return deliver(message)

        self.callback = callback

    def ack(self, message: Message) -> bool:
        # While a rebalance is under way (flow control suspended) or once it has happened
        # (the message's generation is not the consumer's), Faust's streams skip the messages
        # still queued for them and ack them unprocessed. Recorded, such an ack lets the commit
        # Faust makes as the partitions are revoked move past a message that one agent never
        # handled: the fault-injection suite saw down-converted events lost that way after a
        # takeover. Not recorded, the message is read again after the rebalance, as Faust
        # intends: at least once.
        if (not self.app.flow_control.is_active()
                or message.generation_id != self.app.consumer_generation_id):
            with ack_lock:
                message.acked = True
                forget_unacked(self, message)
            return False
        return super().ack(message)

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(driver.Transport):
    """Faust's aiokafka transport with `FetchWaitConsumer`."""

    Consumer = FetchWaitConsumer


class DirectTopic(faust.Topic):
    """Faust's Topic, without three trips through the event loop for every message sent.

    `Topic.publish_message` fetches the producer through `App.maybe_start_producer`, a mode
    `stampede` that awaits `asyncio.sleep(0)` three times per call. On a busy worker each of
    those waits a whole loop cycle (~1-2 ms on 2 cores): a stage-1 batch spent ~40 ms sending
    ~20 repartition messages, and Faust's producer buffer, which sends the tables' changelog
    messages one at a time, drained one message per cycle and throttled every agent. Once the
    producer runs, it is returned as is.
    """

    async def _get_producer(self) -> Any:
        producer = self.app.producer
        if producer.started and not self.app.in_transaction:
            return producer
        return await super()._get_producer()


class App(faust.App):
    """`faust.App` carrying our `Settings` and using `FetchWaitTransport`."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings.app_id, **kwargs)
        self.settings = settings
        #: Which agents are retrying a batch, since when (read by the watchdog).
        self.retries = Retries(log_interval=settings.stuck_after)

    def _new_transport(self) -> Any:
        return FetchWaitTransport(self.conf.broker_consumer, self)

    def _new_web(self) -> Any:
        # Faust's aiohttp driver, with one error format and bounded read times and connections.
        web = super()._new_web()
        s = self.settings
        guard(web, Limits(header_timeout=s.http_header_timeout, body_timeout=s.http_body_timeout,
                          max_connections=s.http_max_connections))
        return web
