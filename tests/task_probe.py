"""Test-only: runs inside the emulated image (pickled by value, so it needs nothing of tests/)."""

from __future__ import annotations

import os
import pickle
import sys


def unpickle_and_report(blobs: dict[str, bytes], head_address: str) -> dict:
    """Load each pickled task object as a task would; report what it took and where it came from."""
    loaded = {name: type(pickle.loads(blob)).__name__ for name, blob in blobs.items()}
    ray_fn = pickle.loads(blobs["ray_task"])
    driver = ray_fn.spec.driver_factory(head_address)
    import glmsnake

    return {
        "loaded": loaded,
        "driver_master_addr": driver.env.get("MASTER_ADDR"),
        "driver_no_proxy": driver.env.get("no_proxy"),
        "pydantic_imported": "pydantic" in sys.modules,
        "imported": sorted({m.split(".")[0] for m in sys.modules}),
        "glmsnake_file": glmsnake.__file__,
        "executable": sys.executable,
        "image": os.environ.get("GLMSNAKE_CONTAINER_IMAGE"),
    }
