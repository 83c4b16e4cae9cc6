"""Run the keyed job on a 3-node ray.cluster_utils.Cluster and remove a node midway.

    python node_loss.py CHECKPOINT_DIR {consumers|source}

Prints one JSON line: whether the result equals DuckDB's GROUP BY, and what moved.
Run in its own process by tests/integration/test_cluster.py (a Cluster needs its own Ray).
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
from rayflow.testing import throttle

HEALTH = {  # a dead node is seen in about 1.5 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def main(ck: str, lose: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "_system_config": HEALTH,
            "object_store_memory": 150 * 1024**2,
            "include_dashboard": False,
        },
    )
    w1 = cluster.add_node(
        num_cpus=1, resources={"rf_consumer": 4, "rf_source": 1}, object_store_memory=150 * 1024**2
    )
    cluster.add_node(num_cpus=1, resources={"rf_consumer": 4}, object_store_memory=150 * 1024**2)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
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
    node_of = {}
    for name, actor in run.consumers.items():
        node_of[name] = ray.get(
            actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        )
    src_node = ray.get(
        run.sources[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
    )
    if lose == "source":
        victim = next(n for n in cluster.worker_nodes if n.node_id == src_node)
        cluster.add_node(
            num_cpus=1, resources={"rf_consumer": 4, "rf_source": 1}, object_store_memory=150 * 1024**2
        )
    else:
        victim = next(n for n in cluster.worker_nodes if n.node_id != src_node)
    lost = sorted(m for m, n in node_of.items() if n == victim.node_id)
    cluster.remove_node(victim)
    result = run.wait(timeout_s=240)
    events = data.to_table()  # noqa: F841 - queried by name below
    expected = duckdb.sql(
        "SELECT key, count(value) AS value_count, sum(value) AS value_sum FROM events GROUP BY key"
    ).to_arrow_table()
    got = result.output.select(["key", "value_count", "value_sum"]).sort_by("key")
    ok = got.equals(expected.select(["key", "value_count", "value_sum"]).sort_by("key").cast(got.schema))
    print(
        json.dumps(
            {
                "correct": ok,
                "lost_consumers": lost,
                "source_on_victim": src_node == victim.node_id,
                "recoveries": result.stats["recoveries"],
                "w1": w1.node_id == victim.node_id,
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
