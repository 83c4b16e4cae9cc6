"""May a run resume from a checkpoint written by an earlier run? (DESIGN §5, pure)

Every catalog records the job's shape in ``meta``: the key, the partition map
(with its hash and version), the input schema, the operator specs and the
input splits. A new run with the same name and checkpoint directory is
checked against it field by field:

- key and partition map: must be equal (a changed hash or map would send keys
  to other partitions than their state).
- input schema: columns may be *added* if nullable; a column that went away
  or changed type is refused.
- operators: the same chain; an ``Aggregate`` must keep its ``by``; it may drop
  aggregations, and it may add aggregations over columns that are new in the
  input (their past rows had no value there, so the new aggregate starts from
  null, which is exact). A new aggregation over a column the committed rows
  already had is refused: those rows were never aggregated into it.
- splits: every split with committed positions must still be there.

Anything refused raises :class:`IncompatibleCheckpointError` naming the
column or setting and saying what to do.
"""

from __future__ import annotations

import json

import pyarrow as pa

from rayflow.errors import IncompatibleCheckpointError

_FRESH = "Run with the original setting, or start afresh with a new checkpoint_dir or name."


def schema_to_json(schema: pa.Schema) -> str:
    return json.dumps([[f.name, str(f.type), f.nullable] for f in schema])


def _refuse(name: str, what: str) -> None:
    raise IncompatibleCheckpointError(f"cannot resume pipeline {name!r}: {what}. {_FRESH}")


def check_resume(name: str, old: dict[str, str], new: dict[str, str]) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``new`` may resume ``old``'s checkpoint."""
    if not old:
        return
    for k in ("key", "partition_map"):
        if k in old and old[k] != new.get(k):
            _refuse(name, f"it was written with {k} = {old[k]}, but this run has {k} = {new.get(k)}")
    old_cols: dict[str, tuple[str, bool]] = {}
    if "input_schema" in old and "input_schema" in new:
        old_cols = {n: (t, nl) for n, t, nl in json.loads(old["input_schema"])}
        new_cols = {n: (t, nl) for n, t, nl in json.loads(new["input_schema"])}
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
    if "operators" in old and "operators" in new:
        _check_ops(name, json.loads(old["operators"]), json.loads(new["operators"]), old_cols)
    if "splits" in old:
        gone = sorted(set(json.loads(old["splits"])) - set(json.loads(new.get("splits", "[]"))))
        if gone:
            _refuse(
                name,
                f"input split(s) {gone[:5]} have committed positions but are not in this run's "
                "source; resuming would count their rows again or lose them",
            )


def _check_ops(name: str, old: list[dict], new: list[dict], old_cols: dict) -> None:
    if [o["type"] for o in old] != [o["type"] for o in new]:
        _refuse(
            name, f"the operator chain changed from {[o['type'] for o in old]} to {[o['type'] for o in new]}"
        )
    for i, (a, b) in enumerate(zip(old, new)):
        if a["type"] != "Aggregate":
            continue
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
