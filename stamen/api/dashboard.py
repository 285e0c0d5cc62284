"""``stamen dashboard``: a live view of the swarm in the browser, on the API's ASGI stack.

A ``SwarmWatcher`` thread reads the swarm's health every ``period`` seconds (the same view as
``stamen health``: records, online servers pinged) and keeps an hour of samples of the bottleneck
and the coverage. The app serves the page (``static/dashboard.html``, plain JavaScript and SVG, no
front-end dependency), the health as JSON (``/api/health``, what ``stamen health --json`` prints)
and the samples (``/api/history``); the page polls both and redraws without reloading.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from stamen.dht.health import SwarmHealth

logger = logging.getLogger(__name__)

HISTORY_SECONDS = 3600.0


class Sample(BaseModel):
    time: float
    """Unix time of the reading."""
    bottleneck: float
    """The weakest block's summed throughput (steps/s)."""
    covered: float
    """Fraction of the blocks with at least one live server."""
    live_servers: int


class SwarmWatcher:
    """Reads the swarm's health every ``period`` seconds on a daemon thread; ``latest`` and ``history``."""

    def __init__(self, read: Callable[[], SwarmHealth], period: float = 2.0):
        self._read, self.period = read, period
        self.latest: SwarmHealth | None = None
        self.error: str | None = None
        self.history: deque[Sample] = deque(maxlen=int(HISTORY_SECONDS / period) + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stamen-dashboard-watcher", daemon=True)

    def start(self) -> SwarmWatcher:
        self.refresh()
        self._thread.start()
        return self

    def refresh(self) -> None:
        try:
            health = self._read()
        except Exception as e:  # the DHT or the network: keep the last view, say what failed
            logger.warning("reading the swarm failed: %r", e)
            self.error = f"reading the swarm failed: {e!r}"
            return
        self.latest, self.error = health, None
        covered = 1 - len(health.uncovered_blocks) / max(1, health.num_blocks)
        self.history.append(Sample(time=time.time(), bottleneck=health.bottleneck_throughput, covered=covered,
                                   live_servers=sum(s.live for s in health.servers)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def create_dashboard(watcher: SwarmWatcher) -> FastAPI:
    app = FastAPI(title="Stamen dashboard")
    page = resources.files("stamen.api").joinpath("static/dashboard.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health", response_model=None)
    def health() -> JSONResponse:
        if watcher.latest is None:
            return JSONResponse({"error": watcher.error or "no reading yet"}, status_code=503)
        return JSONResponse(watcher.latest.model_dump(mode="json"))

    @app.get("/api/history")
    def history() -> dict:
        return {"period": watcher.period, "error": watcher.error,
                "samples": [s.model_dump() for s in watcher.history]}

    return app
