"""The channel table: claims, buffering, sweeping."""

from __future__ import annotations

import pytest
import trio

from iii.channels import ChannelClaimedError, ChannelTable


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


@pytest.mark.parametrize("requested, expected", [(None, 64), (0, 1), (5000, 1024), ("x", 64), (True, 64), (16, 16)])
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
