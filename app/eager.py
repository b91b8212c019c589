"""Starting a coroutine on the caller's step, with a Task only for what has to wait.

`asyncio.ensure_future(coro)` runs nothing until the loop's next iteration, and whoever waits
for the Task wakes one or two iterations after it ends. Faust's drain loop does that for every
fetched message (`wait_first(callback(message), suspend_flow.wait())`: four Tasks, three
iterations), so it delivers at the loop's iteration rate, not at the speed of the delivery,
which almost never waits (decode, `put_nowait`). On a worker whose loop is busy with other work
(HTTP lookups, stage batches) an iteration takes tens of ms: two workers caught up on a backlog
at ~16 messages/s each while their agents' queues stood empty (tests/chaos, "2 workers started
together onto a backlog"; docs/reliability.md, "The crawl").

`start_eagerly` is Python 3.12's eager task start (`asyncio.eager_task_factory`) for one
coroutine, on 3.11: its first steps run now; if it finishes, the result is a done future; if it
waits, a Task carries it on from where it stopped.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from app.faust_compat import unmark_blocking


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """Run `coro` until it finishes or first waits; a done future, or a Task that goes on."""
    loop = asyncio.get_running_loop()
    try:
        waiting_on = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[Any] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise  # as a Task's step does
    except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future, as a Task would
        failed: asyncio.Future[Any] = loop.create_future()
        if isinstance(exc, asyncio.CancelledError):
            failed.cancel()
        else:
            failed.set_exception(exc)
        return failed
    return loop.create_task(_carry_on(coro, waiting_on))


async def _carry_on(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """Step `coro` on, as asyncio's Task would, from the future it yielded last."""
    while True:
        try:
            await _until_done(waiting_on)
        except asyncio.CancelledError:
            # This Task was cancelled while `coro` waited. As Task.cancel: cancel what it waits
            # on, and `coro` sees the cancellation when that ends (sent on, it takes the
            # cancelled result); if that cannot be cancelled, raise it where `coro` waits.
            if isinstance(waiting_on, asyncio.Future) and waiting_on.cancel():
                continue
            try:
                waiting_on = coro.throw(asyncio.CancelledError())
            except StopIteration as stop:
                return stop.value
            continue
        try:
            waiting_on = coro.send(None)
        except StopIteration as stop:
            return stop.value


async def _until_done(waiting_on: Any) -> None:
    """Wait until what a coroutine yielded is done, without taking its result (the coroutine
    takes it when sent on): a future, or None (`asyncio.sleep(0)`: one iteration)."""
    if waiting_on is None:
        await asyncio.sleep(0)
        return
    if not isinstance(waiting_on, asyncio.Future):
        raise RuntimeError(f"a coroutine started eagerly yielded {waiting_on!r}, not a future")
    unmark_blocking(waiting_on)  # as a Task does, once it waits for it
    if waiting_on.done():
        return
    woken = asyncio.get_running_loop().create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not woken.done():
            woken.set_result(None)

    waiting_on.add_done_callback(wake)
    try:
        await woken
    finally:
        waiting_on.remove_done_callback(wake)
