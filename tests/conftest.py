"""Shared fixtures: real local Ray (2 CPUs), a real Prefect API (test harness: a subprocess
server on loopback with a temporary SQLite database), the bundled photos and offline weights."""

import os
import sys
from pathlib import Path

# Before Prefect or Ray are imported anywhere: keep test runs quiet and self-contained.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SMALL_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return ROOT / "data" / "sample_images"


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def small_weights(sample_dir, weights_dir) -> Path:
    """Calibrated (non-degenerate) weights for the small model, made offline."""
    from calibrated_weights import write_calibrated_weights

    return write_calibrated_weights(SMALL_MODEL, sample_dir, weights_dir / f"{SMALL_MODEL}.pth")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, namespace="detectflow-tests",
             log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()
