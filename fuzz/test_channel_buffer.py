"""Channel buffers under random operations: the byte bounds and the accounting always hold.

Several :class:`~iii.channel_buffer.FrameBuffer` share one
:class:`~iii.channel_buffer.ByteBudget`; random writes (text and binary, small
and larger than the per-channel bound), reads and closes, without waiting
(``*_nowait``: a refused write is what would make a writer wait).  After each
step: every channel holds at most ``max(max_bytes, one frame)``, all together
at most ``max(limit, one frame)``, the budget equals the sum of what the
buffers hold, frames come out in the order they went in, and a closed reader
holds nothing.
"""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from iii.channel_buffer import ByteBudget, FrameBuffer, frame_cost

_frames = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=1500),
    st.integers(0, 9000).map(lambda n: b"L" * n),  # larger than a channel's bound
)
_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "get", "get", "close_reader", "close_writer"]),
        st.integers(0, 2),
        _frames,
    ),
    max_size=80,
)


@given(_ops, st.integers(500, 6000), st.integers(1000, 12000), st.integers(1, 8))
def test_bounds_and_accounting_hold(ops, max_bytes, limit, max_frames):
    budget = ByteBudget(limit)
    buffers = [
        FrameBuffer(max_frames=max_frames, max_bytes=max_bytes, budget=budget) for _ in range(3)
    ]
    sent: list[list[str | bytes]] = [[], [], []]
    received: list[list[str | bytes]] = [[], [], []]
    for op, index, frame in ops:
        buffer = buffers[index]
        if op == "put":
            try:
                buffer.put_nowait(frame)
                sent[index].append(frame)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        elif op == "get":
            try:
                received[index].append(buffer.get_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                pass
        elif op == "close_reader":
            buffer.close_reader()
        else:
            buffer.close_writer()
        biggest = max((frame_cost(f) for b in buffers for f, _ in b.frames), default=0)
        for b in buffers:
            assert b.buffered_bytes == sum(size for _, size in b.frames)
            assert b.buffered_bytes <= max(b.max_bytes, biggest)
            assert len(b.frames) <= max_frames
            if b.reader_closed:
                assert not b.frames
        assert budget.used == sum(b.buffered_bytes for b in buffers) <= max(limit, biggest)
    for index, buffer in enumerate(buffers):
        got = received[index] + [f for f, _ in buffer.frames]
        assert got == sent[index][: len(got)]  # in order; a closed reader dropped the rest
