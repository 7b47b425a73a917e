"""A two-node LocalCluster on loopback that this pytest process is connected to, for a module's fixture."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator

from quantlab.distributed.local import LocalCluster
from tests.models import require

JOIN_TIMEOUT_S = 30


@contextlib.contextmanager
def connected_cluster(**env: str) -> Iterator[LocalCluster]:
    """A head and one worker (one CPU each, token authentication, ``env`` in their processes) with
    ``ray.init`` done in this process; everything undone on exit."""
    require(importlib.util.find_spec("ray") is not None, "ray is not installed (pip install 'quantlab[ray]')")
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    c = LocalCluster(**env)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        c.start_head()
        c.add_worker("worker")
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=c.token)
        reset_auth_token_state()  # Ray reads the token once per process: read it again
        ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, "the worker node never joined"
            time.sleep(0.2)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()
