"""The lock check that `make test` runs first: this venv equals requirements.lock, drift is named."""

import subprocess
import sys
from pathlib import Path

from tools.lockcheck import drift, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def test_this_venv_matches_the_lock():
    locked = read_lock(LOCK.read_text())
    # The runtime stack and the pins the lock exists for are all in it.
    for name in ("torch", "torchvision", "prefect", "ray", "pyarrow", "s3fs", "moto", "pip"):
        assert name in locked, name
    assert locked["moto"] != "5.2.6"
    # In a fresh interpreter, as `make test` runs it: other tests may add to this one's sys.path.
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "lockcheck.py"), "check", str(LOCK)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_drift_names_missing_changed_and_extra_packages():
    locked = {"a": "1.0", "b": "2.0"}
    assert drift(locked, {"a": "1.0", "b": "2.0"}) == []
    assert drift(locked, {"a": "1.1", "c": "3"}) == [
        "a: 1.1 installed, 1.0 locked", "missing: b==2.0", "not in the lock: c==3"]


def test_lock_lines_are_read_with_normalised_names():
    text = ("# comment\nFoo_Bar==1.2 \\\n    --hash=sha256:00\n    # via x\n"
            "zope.interface==7.0 ; python_version >= '3'\n")
    assert read_lock(text) == {"foo-bar": "1.2", "zope-interface": "7.0"}


def test_check_fails_on_a_lock_that_pins_another_version(tmp_path):
    text = LOCK.read_text().replace("\npyarrow==", "\npyarrow==0.0.1.dev0+", 1)
    stale = tmp_path / "requirements.lock"
    stale.write_text(text)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "lockcheck.py"), "check", str(stale)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "pyarrow:" in out.stderr and "installed" in out.stderr
