"""What an agent's actors are doing: whether each runs, and the awaitables it is parked on.

The watchdog tells a deadlock from a retry loop by whether an actor stays parked on the very
same awaitable, and names where it waits in the stuck report.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.faust_compat import agent_actors

if TYPE_CHECKING:
    from faust.types import AgentT
    from faust.types.agents import ActorRefT


def actors_of(agent: AgentT) -> list[ActorRefT]:
    """The agent's current actors (the supervisor's list: replaced ones are dropped from it)."""
    return agent_actors(agent)


def is_running(actor: ActorRefT) -> bool:
    """Whether the actor's task is still going."""
    task = actor.actor_task
    return task is not None and not task.done()


def await_path(actor: ActorRefT) -> list[Any]:
    """The awaitables the actor's coroutine (or async generator) waits through now, outermost first."""
    obj: Any = actor.it  # the agent function's coroutine/async generator (what Faust formats tracebacks of)
    path = [obj]
    for _ in range(200):
        obj = (getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
               or getattr(obj, "gi_yieldfrom", None))
        if obj is None:
            break
        path.append(obj)
    return path


def await_leaf(actor: ActorRefT) -> Any:
    """The innermost awaitable the actor waits on now."""
    return await_path(actor)[-1]


def await_chain(actor: ActorRefT, limit: int = 12) -> str:
    """Where the actor waits now, as function names outermost first (for the stuck report)."""
    names = []
    for obj in await_path(actor):
        code = getattr(obj, "cr_code", None) or getattr(obj, "ag_code", None) or getattr(obj, "gi_code", None)
        names.append(code.co_name if code is not None else repr(obj)[:160])
    return " > ".join(names[-limit:])
