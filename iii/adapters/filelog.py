"""A durable append-only record log: the persistence under every file-based adapter.

Each record is one JSON value framed as ``<u32 length><u32 crc32><payload>``
(little-endian).  :meth:`RecordLog.append` returns only after the record is
written *and* fsync'd, so a write acknowledged to a caller survives ``kill -9``
at any moment.  Concurrent appends share one ``fsync`` (group commit): whoever
holds the flush lock writes every record queued so far, and the others find
their record already durable when they get the lock.  An append is not
interruptible: it waits (shielded) until its record is on disk, so a caller
never sees ``Cancelled`` for a record that a later batch writes.  A failed
write fails every append whose record it carried, and the log refuses later
appends.

Recovery (:func:`open_record_log`) reads frames until the first one that is
incomplete or fails its checksum.  What follows is *reported*, never silently
dropped: the damaged file is copied aside to ``<name>.corrupt-<unix time>``,
an error is logged with the offset and byte count, the log is truncated to the
last good frame, and the :class:`Recovery` returned says so.

The log never holds a record it could not read back: a record over
``max_record`` bytes (at most :data:`MAX_RECORD`, 256 MiB, the most recovery
reads) is refused with :class:`RecordTooLargeError` before anything is
queued.  :meth:`RecordLog.encode` lets a caller frame (and so check) its
record *before* it changes its memory, then append the frame with
:meth:`RecordLog.append_encoded`.

Compaction (:meth:`RecordLog.rewrite`) writes a snapshot of the live state to
a temporary file, fsyncs it, renames it over the log and fsyncs the directory,
so a crash at any point leaves either the old log or the new one.

File I/O runs in worker threads (``trio.to_thread``); the trio loop never
blocks on the disk.

Lifetime: a :class:`RecordLog` is opened by :func:`open_record_log` and belongs
to the backend that opened it, which closes it (:meth:`RecordLog.aclose`) when
its adapter closes; it runs no task of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from iii.adapters.limits import ValueTooLargeError

__all__ = [
    "RecordLog",
    "Recovery",
    "RecordTooLargeError",
    "open_record_log",
    "HEADER",
    "MAX_RECORD",
]

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
MAX_RECORD = 256 * 1024 * 1024


@attrs.frozen
class Recovery:
    """What was read back at open."""

    records: int
    good_bytes: int
    damaged_bytes: int = 0
    reason: str | None = None
    saved_copy: str | None = None

    @property
    def damaged(self) -> bool:
        return self.damaged_bytes > 0


class RecordTooLargeError(ValueTooLargeError):
    """A record larger than the log takes: refused, nothing written."""


def _frame(record: Any, max_record: int) -> bytes:
    payload = orjson.dumps(record)
    if len(payload) > max_record:
        raise RecordTooLargeError(
            f"a record of {len(payload)} bytes is more than the store's log takes ({max_record})"
        )
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read_frames(path: Path) -> tuple[list[Any], Recovery]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], Recovery(records=0, good_bytes=0)
    records: list[Any] = []
    offset = 0
    reason = None
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            reason = "truncated frame header"
            break
        length, crc = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if length > MAX_RECORD or start + length > len(data):
            reason = "truncated record" if length <= MAX_RECORD else "impossible record length"
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            reason = "checksum mismatch"
            break
        try:
            records.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            reason = "undecodable record"
            break
        offset = start + length
    damaged = len(data) - offset
    return records, Recovery(
        records=len(records), good_bytes=offset, damaged_bytes=damaged, reason=reason
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class RecordLog:
    path: Path
    fsync: bool = True
    # The largest record written (recovery reads up to MAX_RECORD whatever
    # this is, so a smaller value, as tests use, never makes a log unreadable).
    max_record: int = attrs.field(default=MAX_RECORD)
    _fd: int = -1
    _queued: list[bytes] = attrs.field(factory=list)
    _queued_seq: int = 0  # sequence number of the last queued record
    _durable_seq: int = 0  # sequence number of the last record on disk
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    # The error of a failed write: what was queued with it was lost.
    _failure: OSError | None = None
    size: int = 0
    records_since_rewrite: int = 0

    def _open_fd(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @max_record.validator
    def _check_max_record(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 < value <= MAX_RECORD:
            raise ValueError(f"max_record must be between 1 and {MAX_RECORD}, got {value}")

    def encode(self, record: Any) -> bytes:
        """The frame of ``record``, for :meth:`append_encoded`; raises
        :class:`RecordTooLargeError` (and changes nothing) if it is too large."""
        return _frame(record, self.max_record)

    async def append(self, record: Any) -> None:
        """Append one record; returns once it is durable."""
        await self.append_encoded((self.encode(record),))

    async def append_many(self, records: Iterable[Any]) -> None:
        """Append records; each is framed (and checked) before any is queued."""
        await self.append_encoded([self.encode(r) for r in records])

    async def append_encoded(self, frames: Iterable[bytes]) -> None:
        """Append frames from :meth:`encode` atomically with respect to recovery
        order; durable on return.

        Not interruptible: once queued, another holder of the flush lock may
        write the records in its batch anyway, so the wait for the lock and
        the write are shielded (bounded by the disk), and a caller that
        changed its memory before appending stays in step with the log even
        when it is being cancelled.  Raises :class:`OSError` if the write
        carrying these records failed; the log then refuses every later
        append (its tail on disk is unknown until the next open recovers it).
        """
        frames = list(frames)
        if not frames:
            return
        self._check_usable()
        self._queued.append(b"".join(frames))
        self._queued_seq += 1
        my_seq = self._queued_seq
        self.records_since_rewrite += len(frames)
        with trio.CancelScope(shield=True):
            async with self._lock:
                if self._durable_seq >= my_seq:
                    return  # an earlier holder wrote ours in its batch
                self._check_usable()  # the batch that carried ours failed
                batch, self._queued = b"".join(self._queued), []
                batch_seq = self._queued_seq
                try:
                    await trio.to_thread.run_sync(self._write, batch)
                except OSError as exc:
                    self._failure = exc
                    raise
                self.size += len(batch)
                self._durable_seq = batch_seq

    @property
    def failure(self) -> OSError | None:
        """The failed write after which this log refuses appends, if any."""
        return self._failure

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise OSError(
                self._failure.errno,
                f"{self.path}: the log refuses writes after a failed one: {self._failure.strerror}",
            )

    def _write(self, batch: bytes) -> None:
        view = memoryview(batch)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    async def rewrite(self, records: Iterable[Any]) -> None:
        """Replace the log with ``records`` (compaction), crash-safely.

        ``records`` is consumed under the lock, and every record queued until
        then is dropped once the new log is in place: pass a generator over
        the live state, not a list built before the call (it would miss what
        changed while this waited).  If the rewrite fails (a record too large,
        a disk error), the old log stays and so does everything queued.
        """
        async with self._lock:
            # Anything queued but not yet written must survive the rewrite:
            # callers snapshot state *after* queuing, so it is in `records`
            # (consumed right here, with no await: nothing is queued meanwhile).
            in_snapshot, snapshot_seq = len(self._queued), self._queued_seq
            payload = b"".join(self.encode(r) for r in records)
            await trio.to_thread.run_sync(self._replace, payload)
            del self._queued[:in_snapshot]  # what was queued since is still to write
            self._durable_seq = snapshot_seq
            self.size = len(payload)
            self.records_since_rewrite = 0

    def _replace(self, payload: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # Until here a failure leaves the old log and its descriptor as they
        # were.  From here the file may have changed under the descriptor, so
        # a failure makes the log refuse later appends (they could land in
        # the replaced file); the next open recovers whichever file is there.
        try:
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            os.close(self._fd)
            self._open_fd()
        except OSError as exc:
            self._failure = exc
            raise

    async def aclose(self) -> None:
        async with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _recover(path: Path) -> tuple[list[Any], Recovery]:
    records, recovery = _read_frames(path)
    if not recovery.damaged:
        return records, recovery
    saved = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    shutil.copyfile(path, saved)
    with open(path, "r+b") as file:
        file.truncate(recovery.good_bytes)
        file.flush()
        os.fsync(file.fileno())
    recovery = attrs.evolve(recovery, saved_copy=str(saved))
    log.error(
        "%s: %s at byte %d: %d bytes after the last good record could not be read; "
        "%d records recovered; the damaged file was saved as %s",
        path,
        recovery.reason,
        recovery.good_bytes,
        recovery.damaged_bytes,
        recovery.records,
        saved,
    )
    return records, recovery


async def open_record_log(
    path: str | os.PathLike[str], *, fsync: bool = True, max_record: int = MAX_RECORD
) -> tuple[RecordLog, list[Any], Recovery]:
    """Open (or create) a log; returns it, the records read back, and the recovery report."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    records, recovery = await trio.to_thread.run_sync(_recover, file)
    record_log = RecordLog(path=file, fsync=fsync, max_record=max_record, size=recovery.good_bytes)
    record_log.records_since_rewrite = len(records)
    await trio.to_thread.run_sync(record_log._open_fd)
    return record_log, records, recovery
