"""The published output of another pipeline, as the input of the next stage (DESIGN §12).

A query that needs a second key (join bids by auction, then average by
category) runs as stages, each its own consumer group with its own
checkpoints. The exchange between two stages is the upstream's Parquet sink
directory: a file appears there only when the commit that wrote it is
recorded (the pending area is ``_pending/``, out of sight), and never changes
after; the downstream job reads each file once, recording its name and
fingerprint in its own catalog (:class:`~rayflow.sources.Files`). So the
exchange is exactly-once for free, as Kafka Streams' repartition topics are:
an upstream that crashes replays into files nobody sees until committed, a
downstream that crashes resumes each file at its committed row.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from rayflow.errors import ConfigError
from rayflow.sinks.files import COMPLETE_MARKER
from rayflow.sinks.files import Parquet as ParquetSink
from rayflow.sources.base import DEFAULT_BATCH_ROWS
from rayflow.sources.files import Files

__all__ = ["Upstream"]

#: How often the exchange directory is listed: the delay a stage adds to the results, beside the
#: upstream's commit interval. Listing one local directory five times a second costs nothing.
UPSTREAM_POLL_S = 0.2


class Upstream(Files):
    """Read what an upstream pipeline publishes: ``rf.sources.Upstream(stage1)``.

    ``upstream`` is an ``rf.Pipeline`` whose sink is ``rf.sinks.Parquet`` (its
    directory is read; a relative path is resolved here, in the driver's working
    directory, as the upstream resolves it), or the path of such a directory
    (then give ``schema=``, and ``ends=True`` if the upstream job is bounded).

    - **Append-only.** Every published row is read once, in no particular order
      across files. An upstream that emits an upsert stream (an ``Aggregate``
      over an unbounded input: each commit re-emits the keys that changed) is
      refused: the next stage would count every version. Let the upstream emit
      final rows (windows, joins, a bounded ``Aggregate``).
    - **The end.** Over a bounded upstream the stage is bounded too: it ends once
      the upstream has ended (its sink writes ``_rayflow_complete.json`` after
      its last file is published) and every file is read. Over an unbounded
      upstream it runs until ``run.stop()``.
    - **Schema**: the upstream's output schema, worked out from its source and
      operators at start; a ``Map`` without ``output_schema=`` hides it: pass
      ``schema=``.
    - Caveat: the files stay in the exchange directory after they are read (the
      upstream's output, for anyone to inspect); delete files the stage has
      committed to reclaim the space, never others.
    """

    def __init__(
        self,
        upstream,
        *,
        schema: pa.Schema | None = None,
        ends: bool | None = None,
        poll_s: float = UPSTREAM_POLL_S,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ):
        if isinstance(upstream, (str, os.PathLike)):
            path, name = os.fspath(upstream), None
            self._ends = bool(ends)
        else:
            sink, name = getattr(upstream, "sink", None), getattr(upstream, "name", None)
            if not isinstance(sink, ParquetSink):
                raise ConfigError(
                    f"rf.sources.Upstream reads an upstream pipeline's published Parquet files, but "
                    f"{name!r} has the sink {sink!r}: give it sink=rf.sinks.Parquet('<dir>')"
                )
            if upstream.emits_upserts:
                raise ConfigError(
                    f"the pipeline {name!r} emits an upsert stream (each commit re-emits the keys it "
                    "changed), so a next stage would count every version. Emit final rows instead "
                    "(a window, a join, an Aggregate over a bounded input)"
                )
            path = sink.path
            schema = schema if schema is not None else upstream.output_schema
            self._ends = not upstream.source.unbounded if ends is None else bool(ends)
        if schema is None:
            raise ConfigError(
                f"rf.sources.Upstream({path!r}): the upstream's output schema is unknown (a Map "
                "without output_schema=?): pass schema="
            )
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
        super().__init__(
            path,
            format="parquet",
            watch=True,
            schema=schema,
            poll_s=poll_s,
            assume_renamed=True,  # a published file is renamed into place whole
            batch_rows=batch_rows,
        )
        self.upstream_name = name
        self._complete = False

    def __repr__(self) -> str:
        what = self.upstream_name if self.upstream_name is not None else self._path
        return f"rf.sources.Upstream({what!r})"

    @property
    def unbounded(self) -> bool:
        return not self._ends

    def complete(self) -> bool:
        """True once the bounded upstream has ended: the next listing has every file."""
        if not self._ends or self._complete:
            return self._complete
        info = self._fs.get_file_info(f"{self._base}/{COMPLETE_MARKER}")
        if info.type == pafs.FileType.File:
            self._complete = True
            self._polled_at = None  # list again at the next call, however soon
        return self._complete

    def _list(self) -> dict[str, pafs.FileInfo]:
        # The upstream may not have published anything yet: its directory comes with its first file.
        if not self._remote:
            self._fs.create_dir(self._base, recursive=True)
        return super()._list()
