import os

# Ray 2.60 turns token auth on by default; a test cluster on loopback needs none.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (never attaches to another cluster)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=400 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
