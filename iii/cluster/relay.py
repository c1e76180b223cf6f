"""The forwarding engine's fast path: a worker's call relayed to a peer engine, with no task here.

A worker's ``invokefunction`` whose replica is on a peer engine would
otherwise run as a task on this engine (:mod:`iii.worker_calls`), which
forwards it over the link (:meth:`iii.cluster.peers.Peer.forward`) and
waits.  :func:`relay_call` does the same work from the caller's reader,
synchronously: it files the call in the engine's pending table (its
deadline, the drain), queues the ``invokefunction`` on the link, and the
link socket's reader task hands the answer straight to the caller's socket
(:meth:`RelayedCall.on_answer`, :meth:`iii.link.connection.LinkConnection.start`).
Three of the four task hand-offs of a forwarded call on this engine, and
most of its Python, are gone (README, "Cluster").

The guarantees are the slow path's:

* the grant and ``max_pending_invocations`` are checked before (the caller's
  ``calls_outstanding`` counts the call until it ends), ``_caller_worker_id``
  is set, the trace context goes to the peer and back in the answer as the
  slow path sends them;
* the engine's deadline (``invocation_timeout``) answers ``timeout``; the
  peer leaving or its link dropping answers ``invocation_stopped`` (the
  link fails its calls in flight); the caller leaving ends the call here (a
  late answer is ignored); shutdown's drain waits for the call;
* the answer must fit the caller's frames (else ``payload_too_large``), and
  a caller whose send queue is full gets it from a task that waits, bounded
  by the slow-consumer timeout, as a call task would.

Anything else takes the slow path (:func:`relay_call` returns False and
nothing was done): a tracer installed (the call needs its span), a caller
that is itself a peer's link (its calls run here only), an action
(``void``, ``enqueue``), a local replica chosen, a link that is down or
whose queue is full, a call that cannot be encoded or sent whole (the slow
path then answers why).  Channel refs in the call's data need nothing on
this engine (the engine that runs the call bridges them); refs in the
answer are bridged here, as :meth:`iii.cluster.peers.Peer.forward` does
(:meth:`~iii.cluster.peers.Peer.bridged_result`: the caller opens them on
this engine).  The peer's load in the registry (its calls in flight + 1,
which the cluster pick weighs) counts relayed calls too.

Lifetime: a :class:`RelayedCall` lives from :func:`relay_call` until it ends
once (answer, drop, deadline, caller gone), referenced by the pending table,
the link's table of calls in flight and the caller's ``relayed`` set.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from iii.cluster.peers import PSEUDO_PREFIX, Peer
from iii.errors import FrameTooLargeError, IIIError, InvocationTimeoutError
from iii.invocations import TIMED_OUT, DuplicateInvocationError, Invocation
from iii.link.values import PendingCall, TraceContext
from iii.protocol import ErrorBody, InvocationResult, InvokeFunction, encode_message
from iii.routing import pick_replica

if TYPE_CHECKING:
    from iii.cluster import Cluster
    from iii.engine import Engine
    from iii.worker_conn import WorkerConnection

__all__ = ["relay_call", "RelayedCall"]

log = logging.getLogger(__name__)


def relay_call(
    cluster: Cluster, conn: WorkerConnection, message: InvokeFunction, data: Any
) -> bool:
    """Relay the worker's call to a peer's replica if it may go the fast path
    (module docstring); False: nothing was done, run the slow path."""
    engine = cluster.engine
    if engine.tracer.enabled or conn.grant.cluster_peer or message.invocation_id is None:
        return False
    entry = engine.registry.functions.get(message.function_id)
    if entry is None:
        return False
    try:
        replica = pick_replica(engine, entry, local_only=False)
    except IIIError:
        return False
    owner = replica.owner
    if replica.handler is None or owner is None or not owner.startswith(PSEUDO_PREFIX):
        return False
    peer = cluster.peers.get(owner[len(PSEUDO_PREFIX) :])
    if peer is None or peer.gone or peer.owner_id != owner:
        return False
    timeout = engine.config.invocation_timeout
    deadline = trio.current_time() + timeout
    call = RelayedCall(engine, conn, peer, message, timeout)
    invocation = call.invocation = Invocation(
        invocation_id=str(uuid.uuid4()),
        function_id=message.function_id,
        target_worker_id=owner,
        caller_worker_id=conn.worker_id,
        deadline=deadline,
        on_resolve=call.on_resolve,
    )
    try:
        engine.pending.add(invocation)
    except DuplicateInvocationError:
        return False
    trace = (
        TraceContext(traceparent=message.traceparent, baggage=message.baggage)
        if message.traceparent is not None or message.baggage is not None
        else None
    )
    if not peer.link.start_call_nowait(
        invocation.invocation_id,
        message.function_id,
        data,
        trace=trace,
        on_finish=call.on_answer,
    ):
        engine.pending.discard(invocation)
        return False
    expiry = engine.expiry_scope
    if expiry is not None and deadline < expiry.deadline:
        expiry.deadline = deadline  # the expiry task wakes for this one
    engine.begin_call()
    peer.call_started()
    conn.relayed.add(invocation)
    return True


@attrs.define(eq=False)
class RelayedCall:
    """One relayed call, from :func:`relay_call` until it ends (:meth:`end`)."""

    engine: Engine
    conn: WorkerConnection
    peer: Peer
    message: InvokeFunction
    timeout: float
    invocation: Invocation = attrs.field(init=False)
    ended: bool = False

    def on_answer(self, pending: PendingCall) -> None:
        """The link's answer, or its drop (``invocation_stopped``)."""
        error = pending.error
        if error is None:
            try:
                result = self.peer.bridged_result(pending.result, self.conn.worker_id)
            except IIIError as exc:
                self.end(None, ErrorBody(code=exc.code, message=exc.message))
                return
            self.end(result, None)
        else:
            self.end(
                None,
                ErrorBody(code=error.code, message=error.message, stacktrace=error.stacktrace),
            )

    def on_resolve(self, invocation: Invocation) -> None:
        """The pending table resolved it: the deadline, or the caller left."""
        error = invocation.error
        if error is TIMED_OUT:
            function_id = self.message.function_id
            error = ErrorBody(
                code=InvocationTimeoutError.code,
                message=f"Invocation of {function_id} timed out after {self.timeout:g}s",
            )
        self.end(invocation.result, error)

    def end(self, result: Any, error: ErrorBody | None) -> None:
        if self.ended:
            return
        self.ended = True
        invocation, conn = self.invocation, self.conn
        self.peer.link.forget_call(invocation.invocation_id)
        self.engine.pending.discard(invocation)
        self.peer.call_ended()
        conn.calls_outstanding -= 1
        conn.relayed.discard(invocation)
        try:
            self._answer(result, error)
        finally:
            self.engine.end_call()

    def _answer(self, result: Any, error: ErrorBody | None) -> None:
        # As iii.worker_calls answers a call (tracer off: the caller's context).
        message, conn = self.message, self.conn
        assert message.invocation_id is not None
        answer = InvocationResult(
            invocation_id=message.invocation_id,
            function_id=message.function_id,
            result=result,
            error=error,
            traceparent=message.traceparent,
            baggage=message.baggage,
        )
        try:
            frame = encode_message(answer)
        except orjson.JSONEncodeError as exc:
            log.error("the result of %s cannot be sent as JSON: %s", message.function_id, exc)
            frame = self._error_frame(
                "serialization_error", f"the result cannot be sent as JSON: {exc}"
            )
        try:
            queued = conn.offer_nowait(frame)
        except FrameTooLargeError as exc:
            frame = self._error_frame(exc.code, f"result too large: {exc.message}")
            try:
                queued = conn.offer_nowait(frame)
            except FrameTooLargeError:  # the caller's own ids are too long to answer
                log.warning(
                    "worker %s: the answer to its call of a %d-character function id "
                    "is too large even as an error; dropped",
                    conn.worker_id,
                    len(message.function_id),
                )
                return
        if not queued:
            # A full send queue: wait for room as a call task would (bounded
            # by the slow-consumer timeout, which drops the worker).
            conn.start_task(conn.send, frame, what=f"answer to worker {conn.worker_id}")

    def _error_frame(self, code: str, text: str) -> str:
        message = self.message
        assert message.invocation_id is not None
        return encode_message(
            InvocationResult(
                invocation_id=message.invocation_id,
                function_id=message.function_id,
                error=ErrorBody(code=code, message=text),
            )
        )
