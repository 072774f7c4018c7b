"""An architecture guard (issue 20): the path of one streamed chat completion through both
services crosses at most 16 of tokenrelay's modules, and no module is entered from another more
than twice while the request is set up, nor more than twice per token after it. A change that
adds a hop (a new module on the path, or a chatty interface between two) fails here; the README's
architecture section is written from the same measurement (``scripts/request_path.py``)."""

from __future__ import annotations

from _support.request_path import measure

MAX_MODULES = 16
MAX_ENTRIES = 2


async def test_one_streamed_request_crosses_few_modules_and_enters_none_often() -> None:
    path = await measure()
    report = "\n".join(path.lines())
    # The request went through both services end to end (else the bounds mean nothing).
    for module in ("edge/_generate.py", "orchestrator/_relay.py", "orchestrator/_race.py"):
        assert module in path.order, report
    assert path.per_token("generation.py") > 0, report  # tokens were measured, not only setup
    assert len(path.order) <= MAX_MODULES, report
    chatty = {
        module: (path.setup(module), path.per_token(module))
        for module in path.order
        if path.setup(module) > MAX_ENTRIES or path.per_token(module) > MAX_ENTRIES
    }
    assert not chatty, report
