"""A stop that lands inside a library still stops ``detectflow run`` as a stop."""

import os
import signal
import time

import pytest
from prefect import flow, get_client
from pydantic import BaseModel, field_serializer

from detectflow import interrupt


class _StoppedWhileSerialised(BaseModel):
    """As prefect-ray serialises the run's context for a task: the signal lands in pydantic."""

    signum: int

    @field_serializer("signum")
    def _send(self, signum: int) -> int:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs here, and its exception leaves through pydantic
        return signum


@flow(name="stopped-in-a-library")
def _stopped(signum: int, note: bool) -> None:
    if note:
        with interrupt.noted_in_flow():
            _StoppedWhileSerialised(signum=signum).model_dump()
    else:
        _StoppedWhileSerialised(signum=signum).model_dump()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_wrapped_by_a_library_in_the_flow_still_stops_the_run(signum, prefect_api,
                                                                       monkeypatch):
    monkeypatch.setattr(interrupt, "DEADLINE", 3600.0)  # the test process must live on
    monkeypatch.setattr(interrupt, "_noted", [])
    monkeypatch.setattr(interrupt, "_received", [])
    with interrupt.stop_on_signals():
        if signum == signal.SIGTERM:
            # Prefect's handler takes SIGTERM in a flow; renamed by pydantic, it was lost.
            unnoted = _stopped(signum, False, return_state=True)
            assert interrupt.interrupted() is None
            assert unnoted.is_failed() and "PydanticSerializationError" in unnoted.message
            assert "TerminationSignal" in unnoted.message
        with pytest.raises(interrupt.Interrupted) as stopped:
            _stopped(signum, True)
    assert stopped.value.exit_code == 128 + signum and interrupt.interrupted() == signum
    assert signal.getsignal(signal.SIGTERM) is not interrupt._handler  # restored after the block
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort="EXPECTED_START_TIME_DESC", limit=1)[0]
    assert run.state.type.value == "CRASHED"  # the stop shows as a stop, as anywhere else
