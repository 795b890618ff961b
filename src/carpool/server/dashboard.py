"""The live batching dashboard: ``GET /dashboard`` (a static page) and ``GET /v1/stats/stream``.

::

    engine iterations ─► FrameBuilder (an EngineTap, registered while anyone watches)
    Broadcaster task, every 1/max_fps s: tick() ─► delta JSON once ─► each viewer's mailbox
                                          keyframe JSON once, if a viewer needs one ─┘
    viewer's SSE response ◄── its mailbox (a newer frame replaces an unread one: dropped)

Frames are built and serialised once per tick whatever the number of viewers: a delta (what
changed since the previous tick, see ``dashboard_wire``) for every viewer that got the previous
frame, and a keyframe only when some viewer needs one: it just connected, or its previous frame
was dropped (a delta on a frame it never saw would be wrong). A viewer that does not read keeps
at most one frame waiting (its socket buffers fill, then its mailbox is overwritten), so a slow
or stalled browser never grows server memory. ``/v1/stats/stream``
sits under ``/v1`` and so needs the API key like the API (``Authorization`` header: the page
reads the stream with ``fetch``, not ``EventSource``, which cannot send headers; the key is
typed into the page, kept in ``sessionStorage``, never in the URL). The page and its assets
carry no data and are public.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from carpool.engine.client import EngineClient
from carpool.server.dashboard_frames import FrameBuilder
from carpool.server.errors import APIError
from carpool.server.streaming import SSEResponse

logger = logging.getLogger("carpool.server")

STATIC = resources.files("carpool.server") / "static"
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class Viewer:
    """One open stream: a one-frame mailbox and how many frames it missed."""

    def __init__(self) -> None:
        self.frame: str | None = None
        self.ready = asyncio.Event()
        self.sent = 0
        self.sent_bytes = 0  # characters handed to its response (frames are ASCII)
        self.dropped = 0
        self.keyframes = 0
        self.synced = False  # it has taken every frame since its last keyframe

    def offer(self, delta: str, keyframe: Callable[[], str]) -> None:
        """Leave this tick's frame for the viewer: ``delta`` when it has the previous one,
        else ``keyframe()``; an unread older frame is dropped (and with it the chain)."""
        if self.frame is not None:
            self.dropped += 1
            self.synced = False
        if self.synced:
            self.frame = delta
        else:
            self.frame = keyframe()
            self.keyframes += 1
            self.synced = True
        self.ready.set()

    async def take(self) -> str:
        """Wait for the next frame."""
        await self.ready.wait()
        self.ready.clear()
        frame, self.frame = self.frame, None
        assert frame is not None
        self.sent += 1
        self.sent_bytes += len(frame)
        return frame


class Broadcaster:
    """Builds frames at most ``max_fps`` times a second while anyone watches.

    Args:
        client: the engine client (frames come only through its protocol).
        max_fps: frames per second (10 at most, by the issue's contract).
    """

    def __init__(self, client: EngineClient, max_fps: float = 10.0) -> None:
        assert 0 < max_fps <= 10, f"max_fps must be in (0, 10], got {max_fps}"
        self.client = client
        self.period = 1.0 / max_fps
        self.viewers: set[Viewer] = set()
        self.frames_built = 0
        self._builder: FrameBuilder | None = None
        self._remove_tap: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self) -> Viewer:
        """A new viewer; the first one registers the tap and starts the ticker."""
        viewer = Viewer()
        self.viewers.add(viewer)
        if self._builder is None:
            client = self.client
            self._builder = FrameBuilder(
                client.engine_config,
                client.limits,
                lambda: client.snapshot,
                client.describe,
                view_interval=self.period,
            )
            self._remove_tap = self.client.add_tap(self._builder)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return viewer

    def unsubscribe(self, viewer: Viewer) -> None:
        """Forget ``viewer``; with none left, stop building frames and remove the tap."""
        self.viewers.discard(viewer)
        if self.viewers:
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._remove_tap is not None:
            self._remove_tap()
        self._builder, self._remove_tap = None, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.viewers and self._builder is not None:
            started = loop.time()
            builder = self._builder
            try:
                delta = builder.tick()
                for viewer in list(self.viewers):
                    viewer.offer(delta, builder.keyframe_json)
            except Exception:  # a frame bug must not end the dashboard, nor spam the log
                logger.exception("dashboard frame failed")
                for viewer in self.viewers:  # the deltas no longer follow: start over
                    viewer.synced = False
                await asyncio.sleep(1.0)
                continue
            self.frames_built += 1
            await asyncio.sleep(max(0.0, self.period - (loop.time() - started)))


def install_dashboard(
    app: FastAPI,
    get_client: Callable[[], EngineClient],
    key_required: bool,
    max_fps: float = 10.0,
) -> None:
    """Add ``/dashboard``, its assets and ``/v1/stats/stream`` to ``app``.

    Args:
        app: the server's app (its ``GuardMiddleware`` checks the key on ``/v1/*``).
        get_client: the engine client; raises ``APIError(503)`` while it loads.
        key_required: the server has an API key (the page then asks for it first, rather
            than provoking a 401 that browsers log as a console error).
        max_fps: frames per second of the stream (at most 10).
    """
    holder: dict[str, Broadcaster] = {}

    def broadcaster() -> Broadcaster:
        client = get_client()
        b = holder.get("b")
        if b is None or b.client is not client:
            b = holder["b"] = Broadcaster(client, max_fps)
        return b

    app.state.dashboard = holder  # tests read the viewers' counters

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/dashboard/auth", include_in_schema=False)
    async def auth() -> Response:
        return JSONResponse({"key_required": key_required})

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise APIError(404, f"no dashboard asset {name!r}", code="not_found")
        with resources.as_file(STATIC / name) as path:
            return FileResponse(path, media_type=_ASSETS[name])

    @app.get("/v1/stats/stream")
    async def stats_stream(request: Request) -> Response:
        """Server-sent events: one dashboard frame per event, at most 10 a second."""
        b = broadcaster()
        viewer = b.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    yield f"data: {await viewer.take()}\n\n"
            finally:
                b.unsubscribe(viewer)

        return SSEResponse(events(), on_close=lambda: b.unsubscribe(viewer))
