"""The calls a worker makes: one ``invokefunction`` from the worker's socket to its answer.

A request/response call (an ``invocation_id`` and no ``void`` action) runs as
its own task in the caller's per-connection nursery, so it is cancelled if the
caller leaves; a fire-and-forget call runs in the engine's nursery instead, so
a worker that sends ``trigger_void`` and exits at once loses nothing.  Each
call passes the token's allow-list and the worker's ``max_pending_invocations``
first; object payloads get ``_caller_worker_id``; the answer carries the
engine span's trace context (spec protocol.md §3.9), else the caller's.  An
``enqueue`` action becomes a call of ``engine::queue::enqueue`` and answers
``{messageReceiptId}``.  The call runs under the worker's grant, and at the
causation depth of the trigger firing whose trace it carries (if any).

The answer always goes back: the function is told the caller's frame limit
(``CallContext.reply_limit``) so a store refuses a write whose answer would
not fit, rather than apply it; a result that cannot be encoded or sent is
answered as an error (``serialization_error``, ``payload_too_large``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from iii.causation import firing
from iii.cluster_channels import bridged_channel_refs, has_channel_refs
from iii.errors import FrameTooLargeError, IIIError
from iii.protocol import ErrorBody, InvocationResult, InvokeFunction, encode_message

if TYPE_CHECKING:
    from iii.tracing import Span
    from iii.worker_conn import WorkerConnection

__all__ = ["start_call"]

log = logging.getLogger(__name__)


def start_call(conn: WorkerConnection, message: InvokeFunction) -> None:
    """Start one ``invokefunction`` the worker sent (see the module docstring)."""
    action = message.action
    action_type = action.get("type") if isinstance(action, dict) else None
    detached = message.invocation_id is None or action_type == "void"
    refusal = _refuse_call(conn, message)
    if refusal is not None:
        if detached:
            conn.bad_input_log.log(
                logging.INFO,
                "fire-and-forget call %r from %s dropped: %s",
                message.function_id,
                conn.worker_id,
                refusal.message,
                logger=log,
            )
        else:
            assert message.invocation_id is not None
            conn.send_nowait(
                encode_message(
                    InvocationResult(
                        invocation_id=message.invocation_id,
                        function_id=message.function_id,
                        error=refusal,
                    )
                )
            )
        return
    data = message.data
    if action_type != "enqueue" and isinstance(data, dict):
        data["_caller_worker_id"] = conn.worker_id
    conn.calls_outstanding += 1
    what = f"call {message.function_id!r} ({message.invocation_id!r}) from worker {conn.worker_id}"
    if detached:
        # Fire-and-forget: owned by the engine, not by this connection.
        conn.engine.spawn_detached(_run_call, conn, message, data, False, what=what)
    else:
        conn.start_task(_run_call, conn, message, data, True, what=what)


def _refuse_call(conn: WorkerConnection, message: InvokeFunction) -> ErrorBody | None:
    if not conn.grant.may_invoke(message.function_id):
        conn.bad_input_log.warning(
            "worker %s (token %s) may not invoke %r: refused",
            conn.worker_id,
            conn.grant.name,
            message.function_id,
            logger=log,
        )
        return ErrorBody(
            code="forbidden",
            message=f"token {conn.grant.name!r} may not invoke {message.function_id}",
        )
    limit = conn.engine.config.max_pending_invocations
    if conn.calls_outstanding >= limit:
        if not conn.over_limit_logged:
            conn.over_limit_logged = True
            conn.bad_input_log.warning(
                "worker %s has %d calls outstanding (max_pending_invocations): refusing more",
                conn.worker_id,
                limit,
                logger=log,
            )
        return ErrorBody(
            code="too_many_pending_invocations",
            message=f"this worker already has {limit} calls outstanding (max_pending_invocations)",
        )
    conn.over_limit_logged = False
    return None


async def _run_call(
    conn: WorkerConnection, message: InvokeFunction, data: Any, reply: bool
) -> None:
    engine = conn.engine
    with engine.track_call():
        # The answer carries the engine span's context (protocol.md §3.9), else the caller's.
        spans: list[Span] = []
        try:
            try:
                # An answer that goes back must fit this worker's frames.
                reply_limit = conn.frame_limit if reply else None
                # A call made while handling a trigger's invocation (same trace id)
                # is as deep as that firing: see iii.causation.
                with firing(engine.trace_depths.depth_of(message.traceparent)):
                    result = await _call(
                        conn, message, data, spans.append if reply else None, reply_limit
                    )
                error = None
            except IIIError as exc:
                result, error = (
                    None,
                    ErrorBody(code=exc.code, message=exc.message, stacktrace=exc.stacktrace),
                )
            except Exception:
                log.exception("invocation of %s failed inside the engine", message.function_id)
                result, error = (
                    None,
                    ErrorBody(code="invocation_error", message="internal engine error"),
                )
            if not reply:
                if error is not None:
                    conn.bad_input_log.log(
                        logging.INFO,
                        "fire-and-forget call %r from %s failed: %r: %r",
                        message.function_id,
                        conn.worker_id,
                        error.code,
                        error.message,
                        logger=log,
                    )
                return
            assert message.invocation_id is not None
            span = spans[0] if spans else None
            answer = InvocationResult(
                invocation_id=message.invocation_id,
                function_id=message.function_id,
                result=result,
                error=error,
                traceparent=(span.traceparent if span is not None else None) or message.traceparent,
                baggage=(span.baggage if span is not None else None) or message.baggage,
            )
            try:
                frame = encode_message(answer)
            except orjson.JSONEncodeError as exc:
                # A result the engine could not write (no peer can send one, so
                # an engine-side bug): the caller still gets its answer.
                log.error("the result of %s cannot be sent as JSON: %s", message.function_id, exc)
                frame = _error_answer(
                    message, "serialization_error", f"the result cannot be sent as JSON: {exc}"
                )
            try:
                await conn.send(frame)
            except FrameTooLargeError as exc:
                try:
                    too_large = f"result too large: {exc.message}"
                    await conn.send(_error_answer(message, exc.code, too_large))
                except FrameTooLargeError:  # the caller's own ids are too long to answer
                    log.warning(
                        "worker %s: the answer to its call of a %d-character function id "
                        "is too large even as an error; dropped",
                        conn.worker_id,
                        len(message.function_id),
                    )
        finally:
            conn.calls_outstanding -= 1


def _error_answer(message: InvokeFunction, code: str, text: str) -> str:
    assert message.invocation_id is not None
    return encode_message(
        InvocationResult(
            invocation_id=message.invocation_id,
            function_id=message.function_id,
            error=ErrorBody(code=code, message=text),
        )
    )


async def _call(
    conn: WorkerConnection,
    message: InvokeFunction,
    data: Any,
    on_span: Callable[[Span], None] | None,
    reply_limit: int | None,
) -> Any:
    action = message.action
    if isinstance(action, dict) and action.get("type") == "enqueue":
        receipt = str(uuid.uuid4())
        await conn.engine.invoke(
            "engine::queue::enqueue",
            {
                "queue": action.get("queue"),
                "function_id": message.function_id,
                "data": data,
                "messageReceiptId": receipt,
                "traceparent": message.traceparent,
                "baggage": message.baggage,
            },
            caller_worker_id=conn.worker_id,
            traceparent=message.traceparent,
            baggage=message.baggage,
            on_span=on_span,
            # _refuse_call checked the job's function; the queue records the grant.
            grant=conn.grant,
            grant_checked=True,
        )
        return {"messageReceiptId": receipt}
    cluster = conn.engine.cluster
    peer_url = (
        cluster.peer_url_of_link(conn.worker_id)
        if cluster is not None and conn.grant.cluster_peer and has_channel_refs(data)
        else None
    )
    if peer_url is not None:
        # A call a peer engine forwarded: its channel refs name the peer's channels.
        with bridged_channel_refs(conn.engine, peer_url, data) as bridged:
            return bridged.restore(await _invoke(conn, message, bridged.data, on_span, reply_limit))
    return await _invoke(conn, message, data, on_span, reply_limit)


def _invoke(
    conn: WorkerConnection,
    message: InvokeFunction,
    data: Any,
    on_span: Callable[[Span], None] | None,
    reply_limit: int | None,
) -> Coroutine[Any, Any, Any]:
    # A plain function returning the engine's coroutine: no coroutine layer
    # of its own on the call's path.
    return conn.engine.invoke(
        message.function_id,
        data,
        caller_worker_id=conn.worker_id,
        invocation_id=message.invocation_id,
        traceparent=message.traceparent,
        baggage=message.baggage,
        metadata=message.metadata,
        on_span=on_span,
        reply_limit=reply_limit,
        grant=conn.grant,
    )
