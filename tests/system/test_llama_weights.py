"""The model config's ``weights``: the shipped GGUF re-quantized once at load into the type it
names (real llama.cpp on the real SmolLM2 file), kept and reused, and a name it does not know
refused before anything is written.

A conversion takes a second or two of both cores, so this lives with the slow (system) tier."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest

from tokenrelay.triton_python._llama_cpp import Model, convert_weights
from tokenrelay.triton_python.llama import default_gguf


def described(path: Path) -> str:
    """llama.cpp's description of a loaded GGUF, e.g. ``llama ?B IQ4_NL - 4.5 bpw``."""
    model = Model(path)
    try:
        buffer = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(model.ptr, buffer, len(buffer))
        return buffer.value.decode()
    finally:
        model.close()


@pytest.mark.parametrize(("weights", "file_type"), [("iq4_nl", "IQ4_NL"), ("q5_0", "Q5_0")])
def test_weights_are_converted_once_into_the_named_type(
    tmp_path: Path, weights: str, file_type: str
) -> None:
    converted = convert_weights(default_gguf(), weights, tmp_path)
    assert f" {file_type} " in f" {described(converted)} "
    assert converted.stat().st_size < default_gguf().stat().st_size * 1.1
    written = converted.stat().st_mtime_ns
    assert convert_weights(default_gguf(), weights, tmp_path) == converted
    assert converted.stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == [converted.name]


def test_an_unknown_weights_name_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"iq4_nl.*q5_0.*q8_0"):
        convert_weights(default_gguf(), "q4_k", tmp_path)
    assert list(tmp_path.iterdir()) == []
