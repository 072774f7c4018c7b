"""``tokenrelay ingest``'s refusals before it contacts anything: bad paths, nothing to ingest,
files too large for one call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenrelay import ingest
from tokenrelay.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["ingest", *args, "--collection", "c", "--grpc", "127.0.0.1:9"])
    return int(exited.value.code or 0), capsys.readouterr().err


def test_missing_paths_and_empty_folders_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, str(tmp_path / "nope"))
    assert code == 2 and "no such file or directory" in err
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    code, err = _run(capsys, str(tmp_path))
    assert code == 2 and "no .md, .markdown or .txt files" in err


def test_files_too_large_for_one_call_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_MAX_FILE_BYTES", 10)
    (tmp_path / "small.md").write_text("tiny")
    (tmp_path / "big.md").write_text("x" * 100)
    code, err = _run(capsys, str(tmp_path))
    assert code == 2 and "big.md" in err and "small.md" not in err


def test_an_unreachable_orchestrator_is_a_failure_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.md").write_text("Zorblatt")
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "ingest",
                str(tmp_path),
                "--collection",
                "c",
                "--grpc",
                "127.0.0.1:9",
                "--timeout",
                "2",
            ]
        )
    assert exited.value.code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
