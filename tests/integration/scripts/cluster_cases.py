"""The multi-node cases of tests/integration/test_cluster.py, on one ray.cluster_utils.Cluster.

    python cluster_cases.py CHECKPOINT_DIR

A Cluster needs its own Ray, so the cases run in this process, one after another, on one cluster
(building a 3-node cluster costs more than a case): each case's job has its own checkpoint dir.

1. ``source``: the keyed job on head + w1 (consumers, the source) + w2 (consumers); a node that
   can host the source (w3) joins, and w1, with the source and some consumers, is removed midway.
2. ``consumers``: the same job again on w2 + w3 (the source is on w3); w2, holding consumers
   and not the source, is removed midway.
3. ``shared``: now 2 nodes are alive; a node-local checkpoint_dir is refused unless the user says
   it is shared storage; then the job runs and is exact.

Prints one JSON line per case, ``{"case": NAME, ...}``: whether the result equals DuckDB's GROUP
BY, and what moved or what was refused.
"""

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import duckdb
import ray
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import Cluster

import rayflow as rf
from rayflow.testing import assert_same_rows, keyed_reference, throttle

HEALTH = {  # a dead node is seen in about 1.5 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
STORE = 150 * 1024**2


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def node_loss(cluster: Cluster, ck: str, lose: str) -> dict:
    """Run the keyed job and remove a node midway: the one with the source (``lose="source"``,
    after a node that can host the source has joined) or one with consumers and not the source."""
    data = rf.sources.Synthetic(events=300_000, keys=10_000, seed=5)
    pipeline = rf.Pipeline(
        name="nodeloss",
        source=rf.sources.Table(data.to_table(), batch_rows=10_000),
        key="key",
        partitions=8,
        consumers=4,
        operator=[throttle(60_000), rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")])],
        checkpoint_dir=ck,
        local_paths_shared=True,  # every node of this test cluster is on this machine
        checkpoint_interval_s=0.2,
        progress=False,
        config=rf.EngineConfig(
            fetch_max_bytes=200_000,
            heartbeat_interval_s=0.1,
            consumer_resources={"rf_consumer": 1},
            source_resources={"rf_source": 1},
            manager_resources={"head": 0.01},
        ),
    )
    run = pipeline.start()
    wait_for_condition(lambda: run.status()["processed_rows"] > 60_000, timeout=120)
    consumer_node = {name: node_of(actor) for name, actor in run.consumers.items()}
    src_node = node_of(run.sources[0])
    if lose == "source":
        victim = next(n for n in cluster.worker_nodes if n.node_id == src_node)
        cluster.add_node(num_cpus=1, resources={"rf_consumer": 4, "rf_source": 1}, object_store_memory=STORE)
    else:
        victim = next(n for n in cluster.worker_nodes if n.node_id != src_node)
    lost = sorted(m for m, n in consumer_node.items() if n == victim.node_id)
    cluster.remove_node(victim)
    result = run.wait(timeout_s=240)
    events = data.to_table()  # noqa: F841 - queried by name below
    expected = duckdb.sql(
        "SELECT key, count(value) AS value_count, sum(value) AS value_sum FROM events GROUP BY key"
    ).to_arrow_table()
    got = result.output.select(["key", "value_count", "value_sum"]).sort_by("key")
    ok = got.equals(expected.select(["key", "value_count", "value_sum"]).sort_by("key").cast(got.schema))
    return {
        "case": lose,
        "correct": ok,
        "lost_consumers": lost,
        "source_on_victim": src_node == victim.node_id,
        "recoveries": result.stats["recoveries"],
    }


def shared_paths(ck: str) -> dict:
    """On more than one node, a node-local checkpoint_dir is refused (and nothing starts) unless
    ``local_paths_shared=True`` says it is shared storage; then the job runs, exactly."""
    data = rf.sources.Synthetic(events=20_000, keys=500, seed=1).to_table()

    def job(**kw) -> rf.Pipeline:
        return rf.Pipeline(
            name="shared",
            source=rf.sources.Table(data),
            key="key",
            partitions=2,
            consumers=2,
            operator=rf.ops.Aggregate(by="key", aggs=[("value", "count"), ("value", "sum")]),
            checkpoint_dir=ck,
            progress=False,
            **kw,
        )

    report = {"case": "shared", "nodes": alive_nodes()}
    try:
        job().start().stop()
        report["refused"] = None
    except rf.errors.ConfigError as e:
        report["refused"] = str(e)
    report["started_nothing"] = not os.path.exists(os.path.join(ck, "shared"))
    result = job(local_paths_shared=True).run(timeout_s=180)
    try:
        assert_same_rows(result.output, keyed_reference(data))
        report["correct"] = True
    except AssertionError as e:
        report["correct"] = str(e)
    return report


def main(ck: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "_system_config": HEALTH,
            "object_store_memory": STORE,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=1, resources={"rf_consumer": 4, "rf_source": 1}, object_store_memory=STORE)
    cluster.add_node(num_cpus=1, resources={"rf_consumer": 4}, object_store_memory=STORE)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        for lose in ("source", "consumers"):
            print(json.dumps(node_loss(cluster, os.path.join(ck, lose), lose)), flush=True)
        # Two nodes were removed and one added: head + 1 worker still alive (the GCS sees a
        # removed node as dead within about 1.5 s).
        wait_for_condition(lambda: alive_nodes() == 2, timeout=30)
        print(json.dumps(shared_paths(os.path.join(ck, "shared_case"))), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
