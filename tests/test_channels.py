"""The channel table: claims, buffering, sweeping."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

from iii.channels import ChannelClaimedError, ChannelTable, TooManyChannelsError


async def test_each_side_is_claimed_once_and_frames_are_buffered():
    table = ChannelTable()
    channel = table.create(2)
    assert table.lookup(channel.channel_id, channel.access_key) is channel
    assert table.lookup(channel.channel_id, "wrong") is None
    writer = channel.claim_writer()
    with pytest.raises(ChannelClaimedError):
        channel.claim_writer()
    writer.send_nowait("a")
    writer.send_nowait(b"b")
    with pytest.raises(trio.WouldBlock):  # buffer_size frames, then backpressure
        writer.send_nowait("c")
    writer.close()
    reader = channel.claim_reader()
    assert [frame async for frame in reader] == ["a", b"b"]


@pytest.mark.parametrize(
    "requested, expected", [(None, 64), (0, 1), (5000, 1024), ("x", 64), (True, 64), (16, 16)]
)
async def test_buffer_size_is_clamped(requested, expected):
    assert ChannelTable().create(requested).buffer_size == expected


async def test_sweep_removes_stale_and_finished_channels():
    table = ChannelTable()
    stale = table.create()
    fresh = table.create()
    used = table.create()
    used.claim_writer()
    used.claim_reader()
    finished = table.create()
    finished.writer_done = finished.reader_done = True
    now = trio.current_time()
    assert table.sweep(now + 301) == 3  # stale (unclaimed, old), fresh is old too now, finished
    assert set(table.channels) == {used.channel_id}
    assert table.sweep(now) == 0
    del stale, fresh


async def test_owned_channels_go_with_their_owner():
    table = ChannelTable()
    table.create(owner="w1")
    kept = table.create(owner="w2")
    assert table.remove_owned_by("w1") == 1
    assert list(table.channels) == [kept.channel_id]


# -- bounded in bytes (issue 10 row 8) ---------------------------------------------------

KiB = 1024


def cost(frame: str | bytes) -> int:
    """What a frame counts for: the memory its object takes."""
    return sys.getsizeof(frame)


async def test_a_writer_without_a_reader_buffers_at_most_the_byte_bound():
    table = ChannelTable(channel_buffer_bytes=256 * KiB)
    channel = table.create(1024)  # 1,024 frames allowed: the bytes bound applies first
    writer = channel.claim_writer()
    frame = b"x" * (50 * KiB)
    sent = 0
    with pytest.raises(trio.WouldBlock):
        while True:
            writer.send_nowait(frame)
            sent += 1
    assert sent == 256 * KiB // cost(frame) == 5
    assert channel.buffered_bytes == table.buffered_bytes == sent * cost(frame) <= 256 * KiB


async def test_text_frames_count_by_their_memory_too():
    table = ChannelTable(channel_buffer_bytes=64 * KiB)
    writer = table.create(1024).claim_writer()
    frame = "€" * (10 * KiB)  # two bytes a character in memory
    assert cost(frame) > 20 * KiB
    sent = 0
    with pytest.raises(trio.WouldBlock):
        while True:
            writer.send_nowait(frame)
            sent += 1
    assert sent == 64 * KiB // cost(frame) == 3


async def test_a_frame_larger_than_the_bound_passes_alone_without_deadlock():
    table = ChannelTable(channel_buffer_bytes=16 * KiB)
    channel = table.create()
    writer, reader = channel.claim_writer(), channel.claim_reader()
    big = b"b" * (100 * KiB)
    writer.send_nowait(big)  # an empty buffer takes one frame of any size
    with pytest.raises(trio.WouldBlock):
        writer.send_nowait(b"small")  # ... and nothing else until it is read
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.send, big)  # waits for the first to be taken
        await trio.testing.wait_all_tasks_blocked()
        assert channel.buffered_bytes == cost(big)
        with trio.fail_after(5):
            assert await reader.receive() == big
            assert await reader.receive() == big
    assert channel.buffered_bytes == 0


async def test_all_channels_together_stay_under_the_engine_wide_bound():
    table = ChannelTable(channel_buffer_bytes=64 * KiB, channels_max_bytes=100 * KiB)
    first, second = table.create(), table.create()
    frame = b"f" * (30 * KiB)
    first_writer, second_writer = first.claim_writer(), second.claim_writer()
    first_writer.send_nowait(frame)
    first_writer.send_nowait(frame)
    second_writer.send_nowait(frame)  # 3 frames: 90 KiB and a bit
    with pytest.raises(trio.WouldBlock):
        second_writer.send_nowait(frame)  # room in its own buffer, not engine-wide
    assert table.buffered_bytes == 3 * cost(frame) <= 100 * KiB
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_writer.send, frame)
        await trio.testing.wait_all_tasks_blocked()
        assert table.buffered_bytes == 3 * cost(frame)  # still waiting
        reader = first.claim_reader()
        with trio.fail_after(5):
            await reader.receive()  # frees room engine-wide: the other writer goes on
    assert table.buffered_bytes == 3 * cost(frame)


async def test_a_reader_that_leaves_gives_the_memory_back_at_once():
    table = ChannelTable(channel_buffer_bytes=64 * KiB, channels_max_bytes=100 * KiB)
    channel = table.create()
    writer = channel.claim_writer()
    writer.send_nowait(b"x" * (40 * KiB))
    other = table.create().claim_writer()
    async with trio.open_nursery() as nursery:

        async def blocked_writer() -> None:
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await writer.send(b"y" * (40 * KiB))

        nursery.start_soon(blocked_writer)
        nursery.start_soon(other.send, b"z" * (70 * KiB))  # waits for room engine-wide
        await trio.testing.wait_all_tasks_blocked()
        channel.claim_reader().close()
    assert channel.buffered_bytes == 0
    assert table.buffered_bytes == cost(b"z" * (70 * KiB))


async def test_removing_a_channel_frees_its_frames():
    table = ChannelTable()
    channel = table.create()
    channel.claim_writer().send_nowait(b"x" * 1000)
    assert table.buffered_bytes > 1000
    table.remove(channel)
    assert table.buffered_bytes == 0


async def test_worker_created_channels_are_limited_in_number():
    table = ChannelTable(max_channels=2)
    first = table.create_for_worker(None)
    table.create_for_worker(None)
    for _ in range(3):
        table.create()  # the engine's own (REST) channels do not count
    with pytest.raises(TooManyChannelsError, match="max_channels"):
        table.create_for_worker(None)
    table.remove(first)
    table.create_for_worker(None)
