"""Spilled queue entries: sub-batches a source actor keeps in local Arrow IPC files (DESIGN §6).

When a partition's queue, or the source actor's memory, is at its bound
(``queues.place``), a sub-batch goes to disk instead of the object store. This
module writes it, reads it back for a fetch, and frees it when a commit trims it.

**Layout.** Per partition one *segment* file at a time, in
``<spill_dir>/rayflow-spill/`` (named ``<owner>-p<partition>-<pid>-<n>.arrows``,
``owner`` naming the job and the source actor, :func:`spill_owner`). Each spilled
sub-batch is appended to its partition's segment as one whole Arrow IPC stream
(schema, dictionaries, the batch, end of stream) at an offset its
:class:`SpillHandle` keeps; reading it back memory-maps that range (no copy
before ``ray.put``). A segment holds one partition's entries only, so a slow
partition's disk is freed by its own commits, never held by another's. A
segment is sealed at :func:`segment_bytes`, and *retired* (its disk freed) once
every entry in it is released and no read of it is in progress.

**Owned by the process.** A segment file is unlinked right after it is
created; it is written and read through its descriptor. Its disk is freed when
the descriptor is closed, or when the process ends, however it ends (``ray.kill``
runs no cleanup code; a restarted source replays from the committed positions
and needs nothing of it). Caveat: ``du`` over the spill directory does not see
these files (``df`` does, and ``ls -l /proc/<pid>/fd``). Where the system
refuses to unlink an open file, the name is kept and deleted on retirement, and
leftovers of the same owner are deleted by :meth:`SpillStore.open`.

**Disk bytes.** :attr:`SpillStore.disk_bytes` counts the bytes of the segments
not yet retired, released entries within them too: what the disk holds, and
what ``spill_max_bytes`` bounds. A segment is at most :func:`segment_bytes`
past the entries it still holds, per partition.

**Threads.** :meth:`SpillStore.write` (reading threads), :meth:`SpillStore.read`
(fetch threads) and :meth:`SpillStore.release` (the event loop) may run at
once: the bookkeeping is under one lock, the bytes move outside it (a write
goes to an offset reserved under the lock; a read pins its segment, so its
descriptor cannot be closed, and its number reused, under it).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass

import pyarrow as pa

logger = logging.getLogger(__name__)

#: A segment file is sealed (a new one started) past this many bytes: large enough that a
#: partition's spill is a few files, not one per sub-batch (a paced source spills sub-batches
#: of a few kB), small enough that a segment kept alive by its last entry wastes little disk.
SEGMENT_MAX_BYTES = 16 * 1024 * 1024
#: ... and at least this many, whatever the budget.
SEGMENT_MIN_BYTES = 64 * 1024
#: Segments per partition the disk budget leaves room for (at least): a budget of 8 segments
#: per partition wastes at most an eighth of it on segments held by their last entries.
SEGMENTS_PER_PARTITION = 8

_SUFFIX = ".arrows"


def segment_bytes(spill_max_bytes: int, partitions: int) -> int:
    """The size at which a partition's segment is sealed (pure): the budget over
    :data:`SEGMENTS_PER_PARTITION` segments per partition, within
    ``[SEGMENT_MIN_BYTES, SEGMENT_MAX_BYTES]``."""
    share = spill_max_bytes // max(1, SEGMENTS_PER_PARTITION * partitions)
    return max(SEGMENT_MIN_BYTES, min(SEGMENT_MAX_BYTES, share))


def spill_owner(pipeline: str, job_root: str, index: int) -> str:
    """The file name prefix of source actor ``index``'s spill: the pipeline's name (made safe
    for a file name), a hash of the job's root (two jobs of one name in two checkpoint
    directories never meet) and the actor's index."""
    safe = re.sub(r"[^A-Za-z0-9_.]+", "_", pipeline)[:64]
    h = hashlib.blake2b(job_root.encode(), digest_size=6).hexdigest()
    return f"{safe}-{h}-source{index}"


@dataclass(eq=False, slots=True)
class _Segment:
    partition: int
    fd: int | None  # None once retired
    path: str | None  # kept only where the name could not be unlinked at once
    size: int = 0  # bytes reserved (written, or being written)
    live: int = 0  # entries written or being written, not yet released
    pins: int = 0  # reads in progress


@dataclass(frozen=True, eq=False, slots=True)
class SpillHandle:
    """Where one spilled sub-batch lies: its segment, offset and length in bytes, and its
    schema's metadata (written without it: see :meth:`SpillStore.write`)."""

    segment: _Segment
    offset: int
    length: int
    metadata: dict | None = None


def spillable(schema: pa.Schema) -> bool:
    """Whether batches of ``schema`` come back from an IPC file as they went in: not when a
    field's type is, or holds, an extension type (an unregistered Python one reads back as its
    storage type). Such batches are never spilled."""
    return not any(_has_extension(f.type) for f in schema)


def _has_extension(t: pa.DataType) -> bool:
    if isinstance(t, pa.BaseExtensionType):
        return True
    return any(_has_extension(t.field(i).type) for i in range(t.num_fields))


class SpillStore:
    """The spill of one source actor (see the module docstring).

    ``root``: the directory for the segment files (created by :meth:`open`);
    ``owner``: their name prefix (:func:`spill_owner`); ``partitions`` and
    ``max_bytes`` (the disk budget) size the segments.
    """

    def __init__(self, root: str, owner: str, *, partitions: int, max_bytes: int):
        self.root = root
        self.owner = owner
        self.segment_bytes = segment_bytes(max_bytes, partitions)
        self.disk_bytes = 0
        self._lock = threading.Lock()
        self._current: dict[int, _Segment] = {}
        self._open: set[_Segment] = set()  # every segment not yet retired, sealed ones too
        self._seq = itertools.count()

    def open(self) -> None:
        """Create the directory, and delete files this owner left behind (names that could not
        be unlinked when their process ended). Raises ``OSError`` when the directory cannot be
        created."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):
            if name.startswith(self.owner + "-") and name.endswith(_SUFFIX):
                try:
                    os.unlink(os.path.join(self.root, name))
                except OSError:
                    pass  # another process's, or gone already

    # ------------------------------------------------------------------ write
    def write(self, partition: int, batch: pa.RecordBatch) -> SpillHandle:
        """Append ``batch`` to ``partition``'s segment; the handle to read it back with.

        Raises ``OSError`` (disk full, directory gone); nothing stays reserved then.
        The schema's metadata (pandas writes a JSON of every column into it) is kept in the
        handle, not written: each entry is a whole IPC stream, schema included, so it would
        be on disk once per sub-batch. Its caller checks :func:`spillable` first.
        """
        metadata = batch.schema.metadata
        if metadata:
            batch = batch.replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        data = sink.getvalue()
        with self._lock:
            seg = self._current.get(partition)
            if seg is None or seg.size >= self.segment_bytes:
                seg = self._new_segment(partition)  # the old one is retired when its last entry is
            handle = SpillHandle(seg, seg.size, data.size, metadata or None)
            seg.size += data.size
            seg.live += 1
            self.disk_bytes += data.size
        try:
            _pwrite_all(seg.fd, data, handle.offset)
        except OSError:
            close_files(self.release([handle]))
            raise
        return handle

    def _new_segment(self, partition: int) -> _Segment:
        """Under the lock: a new segment file for ``partition``, unlinked at once."""
        path = os.path.join(self.root, f"{self.owner}-p{partition}-{os.getpid()}-{next(self._seq)}{_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.unlink(path)
            path = None
        except OSError:  # a system that keeps open files' names: deleted on retirement instead
            pass
        seg = self._current[partition] = _Segment(partition, fd, path)
        self._open.add(seg)
        return seg

    # ------------------------------------------------------------------ read
    def read(self, handles: list[SpillHandle]) -> list[pa.RecordBatch | None]:
        """The sub-batches of ``handles``, memory-mapped (valid after their segment retires:
        a mapping keeps its file); None for one whose segment is already retired (every entry
        in it was released: trimmed by a commit)."""
        return self.read_freeing(handles)[0]

    def read_freeing(self, handles: list[SpillHandle]) -> tuple[list[pa.RecordBatch | None], int]:
        """:meth:`read`, and the disk bytes it freed: a segment whose last entries were released
        while this read had it pinned retires as the read ends (the caller wakes whoever waits
        for disk room)."""
        with self._lock:
            pinned = []
            for h in handles:
                ok = h.segment.fd is not None
                if ok:
                    h.segment.pins += 1
                pinned.append(ok)
        retired = []
        freed = 0
        try:
            batches = [_read_one(h) if ok else None for h, ok in zip(handles, pinned)]
        finally:
            with self._lock:
                for h, ok in zip(handles, pinned):
                    s = h.segment
                    if ok:
                        s.pins -= 1
                        if s.pins == 0 and s.live <= 0 and s.fd is not None:
                            freed += s.size
                            retired.append(self._retire(s))
            close_files(retired)
        return batches, freed

    # ------------------------------------------------------------------ release
    def release(self, handles: list[SpillHandle]) -> list[tuple[int, str | None]]:
        """Release entries (trimmed, or never queued). Returns the files of the segments this
        retires, to close with :func:`close_files` (off the event loop: freeing a large file's
        blocks may take a while); their bytes leave :attr:`disk_bytes` at once."""
        retired = []
        with self._lock:
            for h in handles:
                s = h.segment
                s.live -= 1
                if s.live <= 0 and s.pins == 0 and s.fd is not None:
                    retired.append(self._retire(s))
        return retired

    def _retire(self, s: _Segment) -> tuple[int, str | None]:
        """Under the lock: no entry of ``s`` is live or being read: its file goes."""
        fd, s.fd = s.fd, None
        self.disk_bytes -= s.size
        self._open.discard(s)
        if self._current.get(s.partition) is s:
            del self._current[s.partition]
        return fd, s.path

    def close(self) -> None:
        """Close every segment, sealed ones too (the actor goes away): every entry counts as
        released. A segment a read has pinned is closed when that read ends."""
        with self._lock:
            self._current.clear()
            retired = []
            for s in list(self._open):
                s.live = 0
                if s.pins == 0:
                    retired.append(self._retire(s))
        close_files(retired)


def close_files(retired: list[tuple[int, str | None]]) -> None:
    """Close (and, where kept, delete) retired segment files; best effort."""
    for fd, path in retired:
        try:
            os.close(fd)
            if path is not None:
                os.unlink(path)
        except OSError as e:  # nothing left to do with it: the process owns it anyway
            logger.warning("rayflow: closing a spill segment failed: %r", e)


def _pwrite_all(fd: int, data: pa.Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _read_one(h: SpillHandle) -> pa.RecordBatch:
    start = h.offset - h.offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(h.segment.fd, h.offset + h.length - start, access=mmap.ACCESS_READ, offset=start)
    buf = pa.py_buffer(mm).slice(h.offset - start, h.length)
    batch = pa.ipc.open_stream(buf).read_next_batch()
    return batch if h.metadata is None else batch.replace_schema_metadata(h.metadata)
