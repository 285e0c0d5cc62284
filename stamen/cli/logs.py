"""Logging set-up shared by the commands."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
