"""The durable record log: round trip, group commit, compaction, damaged tails."""

from __future__ import annotations

import trio

from iii.adapters.filelog import HEADER, open_record_log


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
