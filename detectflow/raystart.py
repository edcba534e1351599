"""Two fixed one-second waits in the start of a local Ray (2.60), and how a run avoids them.

Both are retry loops that sleep a whole second when the thing they wait for is a few
milliseconds late, which on two busy cores it often is (measured in the Ray logs of our runs):

1. ``ray.init`` looks its new node up in the GCS (``ray._private.services.get_node``) 0.1 s after
   starting the raylet. The raylet registers only once its agents are up (0.9-1.6 s here), and
   the lookup retries once a second, so ``ray.init`` returns 0-1 s after the node is there, with
   the CPUs idle meanwhile (0.13-0.37 s in 3 idle-machine starts, 0.95 s in one whole run).
   ``prompt_node_lookup`` first asks the GCS's node table every 10 ms, then makes the same lookup.
2. The raylet connects to its own object store right after starting it in a thread; when the
   store is not listening yet, Ray's socket retry sleeps ``raylet_client_connect_timeout_
   milliseconds`` (1 s) before the next try (a 1.00 s gap in 5 of 27 starts here).
   ``SYSTEM_CONFIG`` keeps Ray's 10 s of retries but in 20 ms steps.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

SYSTEM_CONFIG = {
    # Our tasks carry a runtime_env, so Ray's two prestarted default workers were never used
    # (~1 CPU-s each at start-up, measured per process).
    "prestart_worker_first_driver": False,
    # 500 x 20 ms: the same 10 s budget as Ray's default 10 x 1 s.
    "raylet_client_connect_timeout_milliseconds": 20,
    "raylet_client_num_connect_attempts": 500,
}
RAYLET_START_WAIT_S = 30.0  # how long ``ray.init`` waits for its raylet (``node.py``)


def wait_registered(gcs_address: str, node_id: str, timeout: float = RAYLET_START_WAIT_S,
                    poll: float = 0.01) -> bool | None:
    """True as soon as the GCS at ``gcs_address`` lists ``node_id``, False at ``timeout``; None
    if the node table cannot be read (Ray's internals moved)."""
    table = None
    try:
        from ray._private import services, state

        table = state.GlobalState()
        table._initialize_global_state(services._get_gcs_client_options(gcs_address))
        deadline = time.monotonic() + timeout
        while not any(node.get("NodeID") == node_id for node in table.node_table()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True
    except Exception:
        log.debug("cannot read the GCS node table", exc_info=True)
        return None
    finally:
        if table is not None:
            with contextlib.suppress(Exception):
                table.disconnect()


@contextlib.contextmanager
def prompt_node_lookup() -> Iterator[None]:
    """While ``ray.init`` starts a local Ray: look the node up once it is registered (1. above).

    Swaps ``ray._private.services.get_node``, which ``ray.init`` calls through the module, for
    one that waits on ``wait_registered`` first, and puts it back on leaving. If Ray no longer
    has it, nothing changes.
    """
    try:
        from ray._private import services

        original = services.get_node
    except (ImportError, AttributeError):
        yield
        return

    def get_node(gcs_address, node_id, *args, **kwargs):
        if wait_registered(gcs_address, node_id, timeout=RAYLET_START_WAIT_S) is False:
            # What Ray's lookup raises when the node is missing: ``ray.init``'s loop then
            # reports its own start-up timeout, after the same 30 s as without this swap.
            raise RuntimeError(f"node {node_id} has not registered with the GCS")
        return original(gcs_address, node_id, *args, **kwargs)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original
