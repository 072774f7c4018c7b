"""Helpers of the test tiers, by concern:

- ``schemas``: ``assert_openai`` (the official OpenAI schemas), ``REPO``;
- ``fakes``: ``FakeSource``, ``ContinuingSource``, ``FakeEmbedder``, ``Clock``, ``Ordered``,
  ``unavailable`` (unit and in-process tests of one module);
- ``composition``: ``relay_for`` (the relay composed as the orchestrator composes it);
- ``triton``: ``triton_metric`` (a real tritonserver's metrics);
- ``tls``: ``make_certificates``; ``spans``: ``SpanSink``; ``waiting``: ``wait_until``,
  ``eventually`` (instead of fixed sleeps);
- ``target``: ``TOKENRELAY_TEST_STACK``, the running stack the ``any_backend`` tests target
  (imported from the module: it reads the environment).

Tests import from the package itself, which re-exports every helper.
"""

from _support.composition import relay_for
from _support.fakes import (
    WORDS,
    Clock,
    ContinuingSource,
    FakeEmbedder,
    FakeSource,
    Ordered,
    RecordingLedger,
    unavailable,
)
from _support.schemas import REPO, SCHEMAS, assert_openai
from _support.spans import SpanSink
from _support.tls import make_certificates
from _support.triton import triton_metric
from _support.waiting import eventually, wait_until

__all__ = [
    "REPO",
    "SCHEMAS",
    "WORDS",
    "Clock",
    "ContinuingSource",
    "FakeEmbedder",
    "FakeSource",
    "Ordered",
    "RecordingLedger",
    "SpanSink",
    "assert_openai",
    "eventually",
    "make_certificates",
    "relay_for",
    "triton_metric",
    "unavailable",
    "wait_until",
]
