"""Sources: where events come from (DESIGN §2.1, §11).

The contract every split keeps (positions, replay, unbounded splits, idle
ticks, positions with gaps, fingerprints) is in ``base.py``. Built in, one
module each: :class:`Table` (in memory, ``table.py``), :class:`Parquet`,
:class:`CSV`, :class:`JSON` and the watched :class:`Files` (``files.py``),
:class:`Synthetic`, the standard events of WORKLOAD.md (``synthetic.py``), and
:class:`Kafka` (``kafka.py``).
"""

from rayflow.sources.base import Source, Split
from rayflow.sources.files import CSV, JSON, Files, Parquet
from rayflow.sources.inputs import Input
from rayflow.sources.kafka import Kafka
from rayflow.sources.nexmark import Nexmark
from rayflow.sources.synthetic import SYNTHETIC_SCHEMA as SYNTHETIC_SCHEMA
from rayflow.sources.synthetic import Synthetic
from rayflow.sources.table import Table
from rayflow.sources.upstream import Upstream

__all__ = [
    "CSV",
    "Files",
    "Input",
    "JSON",
    "Kafka",
    "Nexmark",
    "Parquet",
    "Source",
    "Split",
    "Synthetic",
    "Table",
    "Upstream",
]
