"""May a run resume from a checkpoint written by an earlier run? (DESIGN §5, pure)

The resume record is one type, :class:`JobMeta`: the job's shape (the key,
the partition map with its hash and version, the input schema, the operator
specs and the input splits). The driver builds it, the manager stores it in
the catalog's ``meta`` table (:meth:`JobMeta.to_dict`, JSON strings, the form
every earlier catalog has) and checks a new run against the recorded one in
one place, :func:`check_resume`, field by field:

- key and partition map: must be equal (a changed hash or map would send keys
  to other partitions than their state).
- input schema: columns may be *added* if nullable; a column that went away
  or changed type is refused.
- operators: the same chain; an ``Aggregate`` must keep its ``by``; it may drop
  aggregations, and it may add aggregations over columns that are new in the
  input (their past rows had no value there, so the new aggregate starts from
  null, which is exact). A new aggregation over a column the committed rows
  already had is refused: those rows were never aggregated into it.
- splits: every split with committed positions must still be there; and a
  job whose every partition committed its final output takes no new split
  (its final output cannot be amended). A *dynamic* source (a watched
  directory, a Kafka topic) is not held to its old split list: its splits
  come and go while it runs (the catalog's known splits say which it has
  had), and a split it no longer lists is simply not read again. A run with a
  source that is not dynamic must still list every split the checkpoint has
  read, discovered ones included.

Anything refused raises :class:`IncompatibleCheckpointError` naming the
column or setting and saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from rayflow.errors import IncompatibleCheckpointError, MissingSplitsError

_FRESH = "Run with the original setting, or start afresh with a new checkpoint_dir or name."


@dataclass(frozen=True, kw_only=True)
class JobMeta:
    """The shape of a job, as recorded with its checkpoint (the resume record).

    A field that is ``None`` was not recorded (a catalog written before it
    existed) and is not checked.
    """

    key: tuple[str, ...] | None = None
    #: ``PartitionMap.to_json()``: compared as written.
    partition_map: str | None = None
    #: ``Operator.spec()`` of each operator, in chain order.
    operators: tuple[dict, ...] | None = None
    #: Names of the input's splits.
    splits: tuple[str, ...] | None = None
    #: ``(name, type, nullable)`` of each input column.
    input_schema: tuple[tuple[str, str, bool], ...] | None = None
    #: The source is dynamic (``Source.dynamic``): its split list may change between runs.
    dynamic: bool | None = None

    @classmethod
    def build(
        cls,
        *,
        key: list[str] | tuple[str, ...],
        partition_map_json: str,
        operators: list[dict],
        splits: list[str],
        schema: pa.Schema,
        dynamic: bool = False,
    ) -> JobMeta:
        return cls(
            key=tuple(key),
            partition_map=partition_map_json,
            operators=tuple(operators),
            splits=tuple(splits),
            input_schema=tuple((f.name, str(f.type), f.nullable) for f in schema),
            dynamic=bool(dynamic),
        )

    def to_dict(self) -> dict[str, str]:
        """The catalog's ``meta`` rows: one JSON string per recorded field."""
        out = {}
        if self.key is not None:
            out["key"] = json.dumps(list(self.key))
        if self.partition_map is not None:
            out["partition_map"] = self.partition_map
        if self.operators is not None:
            out["operators"] = json.dumps(list(self.operators))
        if self.splits is not None:
            out["splits"] = json.dumps(list(self.splits))
        if self.input_schema is not None:
            out["input_schema"] = json.dumps([list(c) for c in self.input_schema])
        if self.dynamic is not None:
            out["dynamic"] = json.dumps(self.dynamic)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> JobMeta | None:
        """Read :meth:`to_dict`'s form back; ``None`` for an empty record (a new checkpoint)."""
        if not d:
            return None

        def load(k):
            return json.loads(d[k]) if k in d else None

        key, ops, splits, schema = load("key"), load("operators"), load("splits"), load("input_schema")
        dynamic = load("dynamic")
        return cls(
            key=tuple(key) if key is not None else None,
            partition_map=d.get("partition_map"),
            operators=tuple(ops) if ops is not None else None,
            splits=tuple(splits) if splits is not None else None,
            input_schema=tuple((n, t, bool(nl)) for n, t, nl in schema) if schema is not None else None,
            dynamic=bool(dynamic) if dynamic is not None else None,
        )


def _refuse(name: str, what: str) -> None:
    raise IncompatibleCheckpointError(f"cannot resume pipeline {name!r}: {what}. {_FRESH}")


def check_resume(
    name: str,
    old: JobMeta | None,
    new: JobMeta,
    *,
    finished: bool = False,
    known_splits: tuple[str, ...] | list[str] = (),
) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``new`` may resume ``old``'s checkpoint.

    ``old`` is the recorded shape (``None``: nothing recorded, a fresh start);
    ``finished``: every partition of the checkpoint has committed its final output;
    ``known_splits``: the splits a dynamic source of the checkpoint has had (the catalog's).
    """
    if old is None:
        return
    if old.key is not None and old.key != new.key:
        _refuse(name, f"it was written with key = {list(old.key)}, but this run has key = {_list(new.key)}")
    if old.partition_map is not None and old.partition_map != new.partition_map:
        _refuse(
            name,
            f"it was written with partition_map = {old.partition_map}, but this run has "
            f"partition_map = {new.partition_map}",
        )
    old_cols: dict[str, tuple[str, bool]] = {}
    if old.input_schema is not None and new.input_schema is not None:
        old_cols = {n: (t, nl) for n, t, nl in old.input_schema}
        new_cols = {n: (t, nl) for n, t, nl in new.input_schema}
        for col, (t, _) in old_cols.items():
            if col not in new_cols:
                _refuse(name, f"input column {col!r} ({t}) is gone from the input")
            if new_cols[col][0] != t:
                _refuse(name, f"input column {col!r} changed type from {t} to {new_cols[col][0]}")
        for col, (t, nullable) in new_cols.items():
            if col not in old_cols and not nullable:
                _refuse(
                    name,
                    f"the new input column {col!r} ({t}) is not nullable; only nullable columns can be added",
                )
    if old.operators is not None and new.operators is not None:
        _check_ops(name, list(old.operators), list(new.operators), old_cols)
    if old.splits is not None or known_splits:
        new_splits = set(new.splits or ())
        had = set(old.splits or ()) | set(known_splits)
        gone = [] if new.dynamic else sorted(had - new_splits)
        if gone:
            raise MissingSplitsError(
                f"cannot resume pipeline {name!r}: input split(s) {gone[:5]} have committed "
                "positions but are not in this run's source; resuming would count their rows "
                f"again or lose them. {_FRESH}"
            )
        added = sorted(new_splits - had)
        if finished and added:
            raise IncompatibleCheckpointError(
                f"pipeline {name!r} has finished, and its input now has new split(s) "
                f"{added[:5]}: a finished job's final output cannot be amended. Run the new "
                "input under a new name or checkpoint_dir."
            )


def _list(x):
    return list(x) if x is not None else None


def _check_ops(name: str, old: list[dict], new: list[dict], old_cols: dict) -> None:
    if [o["type"] for o in old] != [o["type"] for o in new]:
        _refuse(
            name, f"the operator chain changed from {[o['type'] for o in old]} to {[o['type'] for o in new]}"
        )
    for i, (a, b) in enumerate(zip(old, new)):
        if a["type"] in ("Window", "Dedup") and json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            _refuse(
                name,
                f"operator #{i} {a['type']} changed from {a} to {b}: its committed state (open "
                "windows, ids seen) was built under the old definition and would be read under the "
                "new one. Run the new definition under a new name or checkpoint_dir",
            )
        if a["type"] != "Aggregate":
            continue
        if a.get("emit", "final") != b.get("emit", "final"):
            _refuse(
                name,
                f"operator #{i} Aggregate emitted {a.get('emit', 'final')!r} and would now emit "
                f"{b.get('emit', 'final')!r} (a live source emits changes, a bounded one the final "
                "result): its output would miss what the other mode never emitted. Run it under a "
                "new name, or keep the source's kind (or pass Aggregate(emit=...) explicitly)",
            )
        if a["by"] != b["by"]:
            _refuse(
                name, f"operator #{i} Aggregate groups by {b['by']} but its state is grouped by {a['by']}"
            )
        before = {tuple(x) for x in a["aggs"]}
        for col, fn in b["aggs"]:
            if (col, fn) in before or (fn == "mean" and {(col, "sum"), (col, "count")} <= before):
                continue
            if col in old_cols or not old_cols:
                _refuse(
                    name,
                    f"operator #{i} Aggregate adds ({col!r}, {fn!r}), but column {col!r} was already in "
                    "the committed rows, which were never aggregated into it",
                )
