"""Starting a coroutine eagerly (app/eager.py): asyncio's Task semantics, minus the Task when
the coroutine never waits."""
from __future__ import annotations

import asyncio

import pytest

from app.eager import start_eagerly


async def test_a_coroutine_that_never_waits_is_done_before_start_eagerly_returns() -> None:
    ran: list[str] = []

    async def deliver() -> str:
        ran.append("delivered")
        return "ok"

    future = start_eagerly(deliver())
    assert ran == ["delivered"] and future.done() and future.result() == "ok"
    assert not isinstance(future, asyncio.Task)


async def test_an_error_before_the_first_wait_is_raised_by_the_future() -> None:
    async def deliver() -> None:
        raise KeyError("poison")

    future = start_eagerly(deliver())
    with pytest.raises(KeyError, match="poison"):
        future.result()


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_the_result_it_waited_for() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def deliver() -> int:
        steps.append("before")
        value = await gate
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield: one loop iteration
        return value + 1

    future = start_eagerly(deliver())
    assert steps == ["before"] and isinstance(future, asyncio.Task) and not future.done()
    gate.set_result(41)
    assert await asyncio.wait_for(future, 5) == 42
    assert steps == ["before", "after"]


async def test_an_error_raised_by_what_the_coroutine_waits_for_reaches_the_coroutine() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caught: list[BaseException] = []

    async def deliver() -> str:
        try:
            await gate
        except ValueError as exc:
            caught.append(exc)
            return "handled"
        return "not reached"

    future = start_eagerly(deliver())
    gate.set_exception(ValueError("broker said no"))
    assert await asyncio.wait_for(future, 5) == "handled"
    assert [str(e) for e in caught] == ["broker said no"]


async def test_cancelling_the_task_cancels_what_the_coroutine_waits_for_and_the_coroutine_sees_it() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def deliver() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    future = start_eagerly(deliver())
    await asyncio.sleep(0)
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert gate.cancelled() and seen == ["cancelled"]


async def test_cancelling_while_the_coroutine_waits_on_a_task_waits_for_that_task_to_end() -> None:
    ended: list[str] = []

    async def inner() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that takes a step, as Task cancellation allows
            ended.append("inner")

    async def deliver() -> None:
        try:
            await asyncio.ensure_future(inner())
        finally:
            ended.append("deliver")

    future = start_eagerly(deliver())
    for _ in range(3):
        await asyncio.sleep(0)
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert ended == ["inner", "deliver"]
