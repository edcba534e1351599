"""A stop that lands inside a library still ends ``detectflow run`` as interrupted."""

import os
import signal
import time

import pytest
from prefect import flow
from pydantic import BaseModel, field_serializer

from detectflow import interrupt


class _StoppedWhileSerialised(BaseModel):
    """As prefect-ray serialises the run's context for a task: the signal lands in pydantic."""

    x: int = 0

    @field_serializer("x")
    def _send(self, x: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs here, and its exception leaves through pydantic
        return x


@flow(name="stopped-in-a-library")
def _stopped(note: bool) -> None:
    if note:
        with interrupt.noted_in_flow():
            _StoppedWhileSerialised().model_dump()
    else:
        _StoppedWhileSerialised().model_dump()


def test_a_sigterm_wrapped_by_a_library_in_the_flow_still_stops_the_run(prefect_api, monkeypatch):
    from prefect import get_client

    monkeypatch.setattr(interrupt, "DEADLINE", 3600.0)  # the test process must live on
    monkeypatch.setattr(interrupt, "_noted", [])
    monkeypatch.setattr(interrupt, "_received", [])
    with interrupt.stop_on_signals():
        unnoted = _stopped(False, return_state=True)
        # Prefect's handler took the signal, pydantic renamed its exception, and it was lost.
        assert interrupt.interrupted() is None
        assert unnoted.is_failed() and "PydanticSerializationError" in unnoted.message
        with pytest.raises(interrupt.Interrupted) as stopped:
            _stopped(True)
    assert stopped.value.exit_code == 143 and interrupt.interrupted() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not interrupt._handler  # restored after the block
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort="EXPECTED_START_TIME_DESC", limit=50)
    states = [r.state.type.value for r in runs if r.flow_id == runs[0].flow_id]
    assert states[:2] == ["CRASHED", "FAILED"]  # the stop shows as a stop, as anywhere else
