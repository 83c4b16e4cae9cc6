"""The sink contract: :class:`Sink`, the pending area, publication (see the package doc)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from rayflow.errors import ProtocolError

if TYPE_CHECKING:  # the store is handed in by the engine; only its type is named here
    from rayflow._internal.checkpoint.store import Store


#: The pending area under a sink's root: outputs written but not yet covered by a recorded commit.
#: Its leading ``_`` hides it from ``pyarrow.dataset``, DuckDB's ``read_parquet('dir/*.parquet')``
#: and Spark (a reader that globs ``**/*.parquet`` still sees it: publication empties it).
PENDING_DIR = "_pending"


def _under(root: str, name: str) -> str:
    """``root/name`` for a local path or a URI, keeping a URI's query (``?endpoint_override=``)."""
    path, sep, query = root.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


class Sink:
    """Base class of sinks.

    A sink names the root directory its files go to, publishes committed
    output files, and reads a finished run's output back (if it keeps one).

    :meth:`publish` is called by the pipeline's manager only, after the
    catalog has recorded the commit that names the file, and possibly many
    times for the same file (a retry after an error, a repeated commit, a
    manager restart): it must be idempotent. The default moves the pending
    file to its final name (the Parquet and Collect sinks).
    """

    #: Whether the catalog must keep the list of published output files for good, because
    #: :meth:`read_output` reads them at the end of the run. Otherwise that list is trimmed with
    #: the commits it came from (the files stay where they were published).
    keeps_output_list: bool = False

    def root(self, *, pipeline_root: str) -> str:
        raise NotImplementedError

    def publish(self, store: Store, name: str) -> None:
        """Make the committed output ``name`` (now ``<root>/_pending/<name>``) visible; idempotent.

        Once the pending file is gone the output is published, and a repeated
        call does nothing. Raising leaves it pending: the manager retries. A
        file neither pending nor published is lost: :class:`ProtocolError`
        (loud, never a silent gap in the output).
        """
        pending = f"{PENDING_DIR}/{name}"
        if store.exists(pending):
            store.move(pending, name)  # replaces an earlier copy of the same rows, if any
        elif not store.exists(name):
            raise _lost(name)

    def read_output(self, store: Store, files: list[str]) -> pa.Table | None:
        """What a finished run hands back as ``result.output``; ``files`` are its published
        outputs in commit order (relative to :meth:`root`). ``None`` for sinks whose output
        lives elsewhere (a dataset directory, a database table)."""
        return None

    def close(self) -> None:
        """Release what :meth:`publish` opened (the manager calls this when the run ends)."""


def _lost(name: str) -> ProtocolError:
    return ProtocolError(
        f"the committed output {name} is neither pending nor published: it was deleted before it "
        "was published, and the sink misses its rows. This is a bug in rayflow, please report it."
    )
