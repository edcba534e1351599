"""Compare a virtualenv with requirements.lock: `check` fails on any drift, `sync` removes extras.

Run it with the virtualenv's own Python. pip installs from the lock (hash-checked) but never
removes what the lock dropped or what was installed by hand; `sync` does, so `make` leaves the
venv equal to the lock and `make test` refuses one that drifted since.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LOCK_PYTHON = (3, 11)
# The project itself is installed editable from the checkout, not from the lock.
PROJECT = "detectflow"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalisation, so `Foo_Bar` in the venv matches `foo-bar` in the lock."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """`name==version` pins of a requirements-format lock (hash and comment lines ignored)."""
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """The distributions this interpreter sees, the project itself left out."""
    dists = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    dists.pop(PROJECT, None)
    return dists


def drift(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per difference: missing, another version, or not in the lock."""
    lines = []
    for name in sorted(locked.keys() | have.keys()):
        want, got = locked.get(name), have.get(name)
        if got is None:
            lines.append(f"missing: {name}=={want}")
        elif want is None:
            lines.append(f"not in the lock: {name}=={got}")
        elif want != got:
            lines.append(f"{name}: {got} installed, {want} locked")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["check", "sync"])
    ap.add_argument("lock", type=Path, nargs="?", default=Path("requirements.lock"))
    args = ap.parse_args(argv)
    if sys.version_info[:2] != LOCK_PYTHON:
        print(f"lockcheck: the lock is for Python {'.'.join(map(str, LOCK_PYTHON))}, this venv "
              f"runs {sys.version.split()[0]}", file=sys.stderr)
        return 1
    locked = read_lock(args.lock.read_text())
    if args.action == "sync":
        extras = sorted(set(installed()) - set(locked))
        if extras:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extras],
                           check=True)
    problems = drift(locked, installed())
    if problems:
        print(f"lockcheck: .venv differs from {args.lock} (run `make install-dev`, or `make lock` "
              "to change the lock on purpose):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
