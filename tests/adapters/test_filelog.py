"""The durable record log: round trip, group commit, compaction, damaged tails."""

from __future__ import annotations

from pathlib import Path

import trio

from iii.adapters.filelog import HEADER, RecordLog, open_record_log


async def test_records_come_back_in_order(tmp_path):
    path = tmp_path / "log.bin"
    record_log, records, recovery = await open_record_log(path)
    assert records == [] and not recovery.damaged
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(record_log.append, {"i": i})
    await record_log.append_many([{"a": 1}, {"b": [1, 2]}])
    await record_log.aclose()
    _, records, recovery = await open_record_log(path)
    assert sorted(r["i"] for r in records[:50]) == list(range(50))
    assert records[50:] == [{"a": 1}, {"b": [1, 2]}]
    assert recovery.records == 52 and not recovery.damaged


async def test_truncated_tail_is_reported_and_cut(tmp_path):
    path = tmp_path / "log.bin"
    record_log, _, _ = await open_record_log(path)
    await record_log.append({"keep": 1})
    await record_log.append({"keep": 2})
    await record_log.aclose()
    good = path.stat().st_size
    with open(path, "ab") as file:
        file.write(HEADER.pack(100, 0) + b'{"partial"')
    _, records, recovery = await open_record_log(path)
    assert records == [{"keep": 1}, {"keep": 2}]
    assert recovery.damaged and recovery.reason == "truncated record"
    assert recovery.good_bytes == good and recovery.damaged_bytes == HEADER.size + 10
    assert recovery.saved_copy is not None and trio.Path(recovery.saved_copy)
    assert path.stat().st_size == good


async def test_corrupt_record_is_detected(tmp_path):
    path = tmp_path / "log.bin"
    record_log, _, _ = await open_record_log(path)
    await record_log.append({"x": "aaaa"})
    await record_log.append({"x": "bbbb"})
    await record_log.aclose()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the second record
    path.write_bytes(bytes(data))
    _, records, recovery = await open_record_log(path)
    assert records == [{"x": "aaaa"}]
    assert recovery.reason == "checksum mismatch"


async def test_rewrite_replaces_the_log(tmp_path):
    path = tmp_path / "log.bin"
    record_log, _, _ = await open_record_log(path)
    for i in range(100):
        await record_log.append({"set": i})
    await record_log.rewrite([{"snapshot": 99}])
    await record_log.append({"set": 100})
    await record_log.aclose()
    _, records, _ = await open_record_log(path)
    assert records == [{"snapshot": 99}, {"set": 100}]


async def test_a_record_is_logged_exactly_when_its_append_returned(tmp_path):
    # Cancelled appends must not leave a record behind that the next append
    # writes: the caller was told "not done" (it rolls its memory back).
    path = tmp_path / "log.bin"
    record_log, _, _ = await open_record_log(path)
    with trio.CancelScope() as scope:
        scope.cancel()
        await record_log.append({"n": 1})
    first_returned = not scope.cancelled_caught
    await record_log.append({"n": 2})
    await record_log.aclose()
    _, records, _ = await open_record_log(path)
    assert ({"n": 1} in records) == first_returned
    assert {"n": 2} in records


async def test_a_failed_write_fails_every_record_it_carried(tmp_path):
    # /dev/full refuses every write (ENOSPC): two appends that share one
    # group-commit batch must both fail, neither may report success.
    record_log = RecordLog(path=Path("/dev/full"), fsync=False)
    record_log._open_fd()
    outcomes: list[str] = []

    async def append(n: int) -> None:
        try:
            await record_log.append({"n": n})
        except OSError:
            outcomes.append("failed")
        else:
            outcomes.append("durable")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, 1)
        nursery.start_soon(append, 2)
    await record_log.aclose()
    assert outcomes == ["failed", "failed"]
