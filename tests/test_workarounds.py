"""The start-up shortcuts that touch private names: fenced in one package the core never imports,
applied only on the versions they were verified on, one WARNING where they step aside. (The whole
run with every one of them off gives the same detections: tests/test_cli.py.)"""

import ast
import logging
from importlib import metadata
from pathlib import Path

import pytest

from detectflow import workarounds

ROOT = Path(__file__).resolve().parent.parent
CORE = ("listing", "imaging", "predictor", "pipeline", "publish", "sample", "schema", "storage",
        "models", "config")
PRIVATE = ("._private", "_system_config", "PREFECT__", "_run_prefect_task", "torch._dynamo")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", CORE)
def test_the_core_library_never_imports_the_workarounds(module):
    source = ROOT / "detectflow" / f"{module}.py"
    assert not [name for name in _imports(source) if "workarounds" in name]


def test_private_names_live_only_in_the_workarounds_package():
    outside = [path.relative_to(ROOT) for folder in ("detectflow", "flows", "tasks")
               for path in (ROOT / folder).rglob("*.py")
               if "workarounds" not in path.parts
               and any(word in path.read_text() for word in PRIVATE)]
    assert outside == []


def test_each_applies_on_the_versions_it_was_verified_on():
    # This venv holds exactly the verified stack (requirements.lock).
    for name, (_, versions) in workarounds.VERIFIED.items():
        assert {d: metadata.version(d).split("+")[0] for d in versions} == versions, name
        assert workarounds.applies(name), name


def test_another_version_takes_the_plain_path_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(workarounds.VERIFIED, "ray_shutdown",
                        ("a shortcut", {"ray": "0.0.1", "prefect": metadata.version("prefect")}))
    monkeypatch.setattr(workarounds, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="detectflow.workarounds"):
        assert workarounds.applies("ray_shutdown") is False
        assert workarounds.applies("ray_shutdown") is False
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"ray {metadata.version('ray')} (verified on 0.0.1)" in message
    assert "prefect" not in message.split("on ray")[-1]  # only what differs is named
    assert workarounds.applies("api_server") is True  # the others are untouched


def test_the_test_switch_turns_every_one_off(monkeypatch):
    monkeypatch.setenv(workarounds.OFF_ENV, "off")
    assert not any(workarounds.applies(name) for name in workarounds.VERIFIED)
    assert workarounds.actor_runtime_env() == {}
