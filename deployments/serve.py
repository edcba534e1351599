"""Serve the flow from this machine (``make serve``): the deployments of ``prefect.yaml``, nightly
schedule included, executed by this process instead of a work pool.

One source of truth: names, schedules, parameters and tags are read from ``prefect.yaml``, so the
laptop and the work-pool deployments cannot drift apart. Needs a Prefect API (``prefect server
start``, then ``PREFECT_API_URL=http://127.0.0.1:4200/api``); Ctrl-C stops serving and pauses
the schedules.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``to_deployment`` keyword arguments of each deployment in ``prefect.yaml`` (pure)."""
    from prefect.schedules import Cron

    specs = []
    for dep in yaml.safe_load(path.read_text())["deployments"]:
        specs.append({
            "name": dep["name"],
            "description": dep.get("description"),
            "tags": dep.get("tags") or [],
            "parameters": dict(dep.get("parameters") or {}),
            "enforce_parameter_schema": dep.get("enforce_parameter_schema", True),
            "schedules": [
                Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                for s in dep.get("schedules") or []
            ],
        })
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1,
                        help="flow runs executed at once by this process (default 1)")
    args = parser.parse_args(argv)

    from prefect import serve
    from prefect.deployments.runner import EntrypointType

    from flows.detect_objects import detect_objects

    # Module-path entrypoint: runs import ``flows.detect_objects`` as a package module, which Ray
    # workers can import too (a file-path entrypoint loads it as a bare ``detect_objects`` module
    # that Ray cannot unpickle: "No module named 'detect_objects'").
    serve(*(detect_objects.to_deployment(**spec, entrypoint_type=EntrypointType.MODULE_PATH)
            for spec in deployment_specs()), limit=args.limit)


if __name__ == "__main__":
    main()
