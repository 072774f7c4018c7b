"""``tokenrelay-edge``: run the HTTP edge with the settings of TOKENRELAY_CONFIG."""

from __future__ import annotations

import sys

from tokenrelay.config import check_exposure, load_settings
from tokenrelay.edge.app import run
from tokenrelay.logs import configure_logging
from tokenrelay.tracing import configure_tracing, shutdown_tracing


def main() -> None:
    try:
        settings = load_settings()
        check_exposure(settings, "edge")
    except (OSError, ValueError) as exc:
        sys.exit(f"tokenrelay-edge: bad configuration: {exc}")
    configure_logging("edge", settings.log_level)
    configure_tracing("edge", settings.tracing)
    try:
        run(settings.edge, settings.secrets, settings.event_loop, settings.tenancy)
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
