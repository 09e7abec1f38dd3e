"""Every test in tests/ray/ starts a real Ray runtime: marked ``ray`` here, by folder (``make test-fast``
deselects them with ``-m "not ray"``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """Synthetic data cached per module; no usage reporting (nothing may reach the network); the module's
    Ray runtime shut down at its end. Test modules that run studies in this process use it."""
    saved = {k: os.environ.get(k) for k in ("MOREID_CACHE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["MOREID_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    yield
    import ray  # the runtime the module's studies left connected

    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
