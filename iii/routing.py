"""How a call runs: the one routing path of :meth:`iii.engine.Engine.invoke`.

* :func:`route`: look the function up; an engine function runs in the
  caller's task under a cancel scope without a deadline, its deadline filed
  in the pending table's heap, whose expiry cancels that scope; a worker's
  call is filed in the pending table (:mod:`iii.invocations`) *before* its
  ``invokefunction`` is sent, and waits for the answer, which the same heap
  resolves with ``timeout``.  One deadline mechanism for both: the call
  answers ``timeout`` up to ``EXPIRY_RESOLUTION`` late.
* :func:`pick_replica`: which replica takes it (the registry's O(1) pick; in
  a cluster a peer engine's replica is weighed by that peer's calls in
  flight, plus one).
* :func:`expire_invocations`: the engine's one expiry task for every call.

Tracing and the grant check are the engine's (``Engine.invoke``), around
:func:`route`.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import trio

from iii.errors import (
    FunctionNotFoundError,
    IIIError,
    InvocationFailedError,
    InvocationTimeoutError,
)
from iii.grants import Grant
from iii.invocations import TIMED_OUT, DuplicateInvocationError, Invocation, NativeCall
from iii.native import CallContext
from iii.protocol import InvokeFunction, encode_message
from iii.registry import FunctionEntry, FunctionRegistration
from iii.tracing import Span

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["route", "pick_replica", "expire_invocations", "EXPIRY_RESOLUTION"]

log = logging.getLogger("iii.engine")

# The expiry task wakes at most this often (a call times out up to this late).
EXPIRY_RESOLUTION = 0.05


async def route(
    engine: Engine,
    function_id: str,
    data: Any,
    *,
    caller_worker_id: str | None,
    invocation_id: str | None,
    traceparent: str | None,
    baggage: str | None,
    metadata: Any,
    timeout: float | None,
    reply_limit: int | None,
    grant: Grant | None,
    span: Span | None,
) -> Any:
    """The one routing path (module docstring): an engine function runs in
    this task, a worker's call is filed in the pending table; the deadline
    heap ends either with ``timeout``."""
    entry = engine.registry.functions.get(function_id)
    if entry is None:
        raise FunctionNotFoundError(function_id)
    if timeout is None:
        timeout = engine.config.invocation_timeout
    replica = pick_replica(engine, entry, local_only=grant is not None and grant.cluster_peer)
    if invocation_id is None:
        invocation_id = str(uuid.uuid4())
    if span is not None:
        span.set_attribute("iii.worker.id", replica.owner or "engine")
    if replica.handler is not None:
        ctx = CallContext(
            function_id=function_id,
            caller_worker_id=caller_worker_id,
            invocation_id=invocation_id,
            traceparent=traceparent,
            baggage=baggage,
            metadata=metadata,
            reply_limit=reply_limit,
            grant=grant,
        )
        call = NativeCall(function_id, invocation_id, trio.current_time() + timeout)
        engine.pending.start_native(call)
        _wake_expiry(engine, call.deadline)
        try:
            with call.scope:
                return await replica.handler(data, ctx)
        finally:
            engine.pending.end_native(call)
        # Reached only when the expiry task cancelled the scope.
        raise InvocationTimeoutError(f"Invocation of {function_id} timed out after {timeout:g}s")
    assert replica.owner is not None
    target = engine.connections.get(replica.owner)
    if target is None:  # registry and connections disagree only during teardown
        raise FunctionNotFoundError(function_id)
    deadline = trio.current_time() + timeout
    invocation = Invocation(
        invocation_id=invocation_id,
        function_id=function_id,
        target_worker_id=replica.owner,
        caller_worker_id=caller_worker_id,
        deadline=deadline,
    )
    try:
        engine.pending.add(invocation)
    except DuplicateInvocationError:
        raise IIIError(
            f"invocation id {invocation_id} is already in use", code="invocation_error"
        ) from None
    _wake_expiry(engine, deadline)
    try:
        try:
            frame = encode_message(
                InvokeFunction(
                    function_id=function_id,
                    data=data,
                    invocation_id=invocation_id,
                    traceparent=traceparent,
                    baggage=baggage,
                    metadata=metadata,
                )
            )
        except orjson.JSONEncodeError as exc:  # a value no peer could have sent
            raise IIIError(
                f"the data for {function_id} cannot be sent as JSON: {exc}",
                code="serialization_error",
            ) from None
        # Both waits are bounded: the send by the worker's slow-consumer
        # timeout, the answer by the deadline (expire_invocations).
        await target.send(frame)
        await invocation.done.wait()
    finally:
        engine.pending.discard(invocation)
    error = invocation.error
    if error is TIMED_OUT:
        raise InvocationTimeoutError(f"Invocation of {function_id} timed out after {timeout:g}s")
    if error is not None:
        raise InvocationFailedError(error.message, code=error.code, stacktrace=error.stacktrace)
    return invocation.result


def _wake_expiry(engine: Engine, deadline: float) -> None:
    """Make the sleeping expiry task wake by ``deadline`` (a call just filed it)."""
    expiry = engine.expiry_scope
    if expiry is not None and deadline < expiry.deadline:
        expiry.deadline = deadline


def pick_replica(engine: Engine, entry: FunctionEntry, *, local_only: bool) -> FunctionRegistration:
    """The replica to run a call on: the registry's O(1) pick, where a peer
    engine's replica counts one more than its calls in flight (so an idle
    local replica is preferred; :class:`~iii.registry.ReplicaQueues`).  A
    call a peer engine forwarded (``local_only``) runs on this engine's own
    replicas only."""
    cluster = engine.cluster
    if cluster is None or not local_only:
        return entry.pick()
    replica = entry.pick_local(cluster.is_remote)
    if replica is None:
        raise FunctionNotFoundError(entry.function_id)
    return replica


async def expire_invocations(engine: Engine) -> None:
    """End every call whose deadline has passed with ``timeout``: a routed
    call is resolved, an engine function's cancel scope is cancelled.

    Runs in the engine nursery while serving.  It sleeps until the
    earliest deadline in the pending table (``route`` moves the wake-up
    earlier when it files an earlier one) and, so that a stream of calls
    does not wake it once per call, at most once per
    ``EXPIRY_RESOLUTION`` seconds: a call times out up to that much late.
    """
    while True:
        with trio.CancelScope(deadline=engine.pending.next_deadline) as scope:
            engine.expiry_scope = scope
            try:
                await trio.sleep_forever()
            finally:
                engine.expiry_scope = None
        for call in engine.pending.expire(trio.current_time()):
            log.debug("%s (%s) timed out", call.function_id, call.invocation_id)
        await trio.sleep(EXPIRY_RESOLUTION)
