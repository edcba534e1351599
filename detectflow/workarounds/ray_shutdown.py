"""Stop a local Ray's autoscaler monitor before ``ray.shutdown()`` does, without its 1 s wait.

Ray stops a local cluster's processes one at a time, raylet and GCS first, giving each a SIGTERM
and one second. The monitor's SIGTERM handler then reports to the GCS that is already gone, so it
always takes the whole second before Ray kills it. It only scales a cluster, and a local one
never scales, so it is killed first; ``ray.shutdown()`` stops the rest as usual.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def stop_monitor() -> None:
    """Kill the monitor of the Ray this process started; any surprise leaves it to Ray."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node else []
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # Ray's own shutdown still stops everything
        log.warning("detectflow: could not stop Ray's autoscaler monitor early", exc_info=True)
