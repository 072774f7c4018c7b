"""The services' gRPC socket I/O: grpcio's poller, selected before grpc is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tokenrelay._grpc_io import POLLER, VARIABLE, choose_io, io_in_force


def test_the_poller_is_chosen_when_nothing_else_is() -> None:
    environ: dict[str, str] = {}
    assert choose_io(environ, modules={})
    assert environ == {VARIABLE: POLLER}
    assert io_in_force(environ) == "poller"


@pytest.mark.parametrize("value", ["", "-event_engine_client", "some_other_experiment"])
def test_an_operator_setting_is_kept(value: str) -> None:
    environ = {VARIABLE: value}
    assert not choose_io(environ, modules={})
    assert environ == {VARIABLE: value}
    assert io_in_force(environ) == "event-engine"


def test_nothing_is_changed_once_grpc_is_imported() -> None:
    # grpcio reads the variable when it is imported: setting it later would only mislead the log.
    environ: dict[str, str] = {}
    assert not choose_io(environ, modules={"grpc": object()})
    assert environ == {}
    assert io_in_force(environ) == "event-engine"


def _in_a_new_process(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != VARIABLE}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_a_service_process_imports_grpc_with_the_poller_in_force() -> None:
    # What `python -m tokenrelay.orchestrator` / `tokenrelay.edge` do first: import the package.
    code = "import tokenrelay.orchestrator, os; print(os.environ.get('GRPC_EXPERIMENTS'))"
    assert _in_a_new_process(code) == POLLER
    assert _in_a_new_process(code, GRPC_EXPERIMENTS="") == ""


def test_tritonserver_is_started_without_the_relays_choice() -> None:
    # tritonserver's gRPC reads the same variable: the poller was measured for the relay only.
    code = (
        "import os, tokenrelay.stack._triton as t;"
        "print(t.triton_env().get('GRPC_EXPERIMENTS', 'unset'), os.environ['GRPC_EXPERIMENTS'])"
    )
    assert _in_a_new_process(code) == f"unset {POLLER}"
    # What an operator sets reaches Triton as it is.
    assert _in_a_new_process(code, GRPC_EXPERIMENTS=POLLER) == f"{POLLER} {POLLER}"
