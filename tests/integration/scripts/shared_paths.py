"""On a 2-node ray.cluster_utils.Cluster, a node-local checkpoint_dir is refused unless the user
says it is shared storage; then the job runs and is exact.

    python shared_paths.py CHECKPOINT_DIR

Prints one JSON line. Run in its own process by tests/integration/test_cluster.py (a Cluster
needs its own Ray).
"""

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from ray.cluster_utils import Cluster

import rayflow as rf
from rayflow.testing import assert_same_rows, keyed_reference


def main(ck: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
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

    report = {"nodes": sum(1 for n in ray.nodes() if n["Alive"])}
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
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
