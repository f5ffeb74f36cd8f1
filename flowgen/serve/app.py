"""The transport of `flowgen serve`: one Starlette app, REST and WebSocket on the same port.

* `POST /v1`: a JSON array of tasks, `Authorization: Bearer KEY`; the answer is `{"data": [...]}`,
  or `{"errors": [...]}` when any task failed (never both: the new SDK reads one or the other).
* WebSocket `/v1`: an `authentication` task first (a `connectionSessionUUID` resumes a session),
  then any tasks; each task is answered in its own frame as soon as it is done, so a ping is
  answered while an inference runs.
* `GET /v1/images/<imageUUID>.<ext>`: stored images (results and uploads), until their ttl.
* `GET /v1/stats`: the batcher's queue depth and batch sizes (JSON; the same Bearer key as REST).

Task bodies run in worker threads (validation may fetch URLs and decode images); results come
from the batcher's futures. The app never raises to the client: every problem is an error item.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import anyio
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowgen.engine.cards import ModelCard
from flowgen.serve.auth import KeyCheck, bearer_key
from flowgen.serve.inputs import ImageInputs, InputLimits
from flowgen.serve.protocol import MIME_TYPES, ProtocolError, errors_frame, parse_tasks, task_type_of
from flowgen.serve.store import Store
from flowgen.serve.tasks import ServedModels, TaskService

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_TASKS_PER_KEY = 64  # imageInference tasks one API key may have unfinished at once


class InFlight:
    """Unfinished imageInference tasks per API key, so one client cannot queue the engine for all."""

    def __init__(self, limit: int):
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # released from the batcher's thread

    def take(self, key: str, task: dict) -> None:
        with self._lock:
            if self._counts.get(key, 0) >= self.limit:
                raise ProtocolError("tooManyRequests", f"this API key already has {self.limit} unfinished "
                                    "imageInference tasks; wait for some to finish", http_status=429).for_task(task)
            self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, key: str) -> None:
        with self._lock:
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]


class Server:
    """The app's state: the task service, the key check and the limits."""

    def __init__(self, service: TaskService, keys: KeyCheck, max_body: int, max_tasks_per_key: int):
        self.service, self.keys, self.max_body = service, keys, max_body
        self.in_flight = InFlight(max_tasks_per_key)

    # --- one task, either transport ----------------------------------------------------------

    async def run_task(self, task: Any, base_url: str, key: str) -> tuple[list[dict], list[ProtocolError]]:
        """(data items, errors) of one task other than authentication, sent with API key `key`."""
        try:
            task_type = task_type_of(task)
            if task_type == "ping":
                return [{"taskType": "ping", "pong": True}], []
            if task_type == "imageInference":
                done = await self._accept(task, key, base_url)
                uuid = task["taskUUID"].lower()
                if task.get("deliveryMethod") == "async":
                    return [{"taskType": "imageInference", "taskUUID": uuid}], []
                # shielded: a client that leaves cancels its wait, never the task (nor other waiters)
                await asyncio.shield(asyncio.wrap_future(done))
                return await anyio.to_thread.run_sync(self.service.answer, uuid, base_url), []
            if task_type == "imageUpload":
                uuid = await anyio.to_thread.run_sync(self.service.image_upload, task)
                return await anyio.to_thread.run_sync(self.service.answer, uuid, base_url), []
            if task_type == "getResponse":
                uuid = task.get("taskUUID")
                if not isinstance(uuid, str):
                    raise ProtocolError("invalidTaskUUID", "taskUUID: the task to answer for is required",
                                        parameter="taskUUID", task_type="getResponse")
                return await anyio.to_thread.run_sync(lambda: self.service.answer(uuid.lower(), base_url,
                                                                                  polled=True)), []
            raise ProtocolError("invalidTask", "authentication is a WebSocket task; REST sends "
                                "Authorization: Bearer KEY", task_type=task_type).for_task(task)
        except ProtocolError as err:
            return [], [err.for_task(task)]

    async def _accept(self, task: dict, key: str, base_url: str | None = None):
        """Validate and submit an imageInference task within its key's limit of unfinished tasks."""
        self.in_flight.take(key, task)
        try:
            done = await anyio.to_thread.run_sync(self.service.image_inference, task, base_url)
        except BaseException:
            self.in_flight.release(key)
            raise
        done.add_done_callback(lambda _: self.in_flight.release(key))
        return done

    # --- REST --------------------------------------------------------------------------------

    async def rest(self, request: Request) -> Response:
        if not self.keys.accepts(bearer_key(request.headers.get("authorization"))):
            return _errors([ProtocolError("invalidApiKey", "invalid API key: send Authorization: Bearer KEY with "
                                          "a key this server accepts", http_status=401)])
        try:
            body = await self._body(request)
            tasks = parse_tasks(body)
        except ProtocolError as err:
            return _errors([err])
        key = bearer_key(request.headers.get("authorization")) or ""
        answers = await asyncio.gather(*(self.run_task(task, _base_url(request), key) for task in tasks))
        errors = [error for _, found in answers for error in found]
        if errors:
            return _errors(errors)
        return JSONResponse({"data": [item for items, _ in answers for item in items]})

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than the size limit (a Content-Length over it is refused unread)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int) -> ProtocolError:
        return ProtocolError("requestTooLarge", f"the request body is over the {self.max_body:,}-byte limit "
                             f"({size:,} bytes or more)", http_status=413)

    # --- WebSocket ---------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        sending = asyncio.Lock()
        running: set[asyncio.Task] = set()
        pushing: set[str] = set()  # polled tasks whose results this connection gets when they are done
        authenticated: str | None = None  # the key the connection authenticated with

        async def send(frame: dict) -> None:
            async with sending:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the client left: its results stay stored
                    await websocket.send_json(frame)

        async def answer(task: Any) -> None:
            data, errors = await self.run_task(task, _base_url(websocket), authenticated or "")
            await send(errors_frame(errors) if errors else {"data": data})
            if not errors and data and data[0].get("status") == "processing" and data[0]["taskUUID"] not in pushing:
                pushing.add(data[0]["taskUUID"])  # once per task and connection, however often it polls
                await push_when_done(data[0]["taskUUID"])

        async def push_when_done(task_uuid: str) -> None:
            # the old SDK (runware 0.5) ignores a `processing` answer and waits 30 s on this connection
            # for the polled task's results: send them the moment the task is done (the new SDK,
            # polling, dedups them by imageUUID)
            done = self.service.accepted(task_uuid)
            if done is None:
                return
            await asyncio.shield(asyncio.wrap_future(done))
            data, errors = await self.run_task({"taskType": "getResponse", "taskUUID": task_uuid},
                                               _base_url(websocket), authenticated or "")
            await send(errors_frame(errors) if errors else {"data": data})

        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
                if len(text) > self.max_body:
                    await send(errors_frame([self._too_large(len(text))]))
                    continue
                try:
                    tasks = parse_tasks(text)
                except ProtocolError as err:
                    await send(errors_frame([err]))
                    continue
                for task in tasks:
                    if isinstance(task, dict) and task.get("taskType") == "authentication":
                        frame, accepted = self._authenticate(task)
                        authenticated = accepted if accepted is not None else authenticated
                        await send(frame)
                    elif authenticated is None:
                        await send(errors_frame([ProtocolError(
                            "unauthenticated", "send an authentication task with your apiKey first").for_task(task)]))
                    else:
                        job = asyncio.create_task(answer(task))
                        running.add(job)
                        job.add_done_callback(running.discard)
        except WebSocketDisconnect:
            pass
        finally:
            # tasks keep running (their results are stored for getResponse); only their frames are dropped
            for job in running:
                job.cancel()

    def _authenticate(self, task: dict) -> tuple[dict, str | None]:
        """(the answer frame, the accepted key or None)."""
        key = task.get("apiKey")
        if not self.keys.accepts(key):
            error = ProtocolError("invalidApiKey", "invalid API key: this server does not accept it",
                                  parameter="apiKey", task_type="authentication")
            return errors_frame([error]), None
        key = key if isinstance(key, str) else ""
        resumed = task.get("connectionSessionUUID")
        session = self.service.store.open_session(key, resumed if isinstance(resumed, str) else None)
        return {"data": [{"taskType": "authentication", "connectionSessionUUID": session}]}, key

    # --- stats -------------------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        """The batcher's counters (queue depth, batches, images, mean and max batch size)."""
        if not self.keys.accepts(bearer_key(request.headers.get("authorization"))):
            return _errors([ProtocolError("invalidApiKey", "invalid API key: send Authorization: Bearer KEY with "
                                          "a key this server accepts", http_status=401)])
        return JSONResponse(self.service.batcher.stats())

    # --- images ------------------------------------------------------------------------------

    async def image(self, request: Request) -> Response:
        name = request.path_params["name"]
        uuid, _, ext = name.rpartition(".")
        stored = self.service.store.image(uuid) if uuid else None
        if stored is None or stored.ext != ext.lower() or not stored.path.exists():
            return JSONResponse({"errors": [{"code": "imageNotFound", "message": f"no image {name} here"}]},
                                status_code=404)
        if stored.expires is not None and stored.expires < time.time():
            return JSONResponse({"errors": [{"code": "imageExpired", "message": f"image {name}: its ttl is over"}]},
                                status_code=410)
        return FileResponse(stored.path, media_type=MIME_TYPES.get(stored.ext, "application/octet-stream"))


def create_app(*, batcher: Any, data_dir: str | Path, models: Iterable[ModelCard], keys: frozenset[str] = frozenset(),
               max_body: int = MAX_BODY_BYTES, max_tasks_per_key: int = MAX_TASKS_PER_KEY,
               input_limits: InputLimits = InputLimits()) -> Starlette:
    """The ASGI app. The batcher belongs to the app from here: closing the app closes it."""
    store = Store(data_dir)
    service = TaskService(store, batcher, ServedModels(models), ImageInputs(store, input_limits))
    server = Server(service, KeyCheck(keys), max_body, max_tasks_per_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(service.close)  # finish or fail every accepted task
        store.close()

    app = Starlette(routes=[Route("/v1", server.rest, methods=["POST"]),
                            WebSocketRoute("/v1", server.websocket),
                            Route("/v1/stats", server.stats, methods=["GET"]),
                            Route("/v1/images/{name}", server.image, methods=["GET"])],
                    lifespan=lifespan)
    app.state.server = server
    return app


def _errors(errors: list[ProtocolError]) -> JSONResponse:
    status = max(error.http_status for error in errors)
    return JSONResponse(errors_frame(errors), status_code=status)


def _base_url(connection: HTTPConnection) -> str:
    """http(s)://host:port of this request, for imageURL (a WebSocket's ws:// becomes http://)."""
    url = connection.url
    scheme = "https" if url.scheme in ("https", "wss") else "http"
    return f"{scheme}://{url.netloc}"
