"""The transport of `flowgen serve`: one Starlette app, REST and WebSocket on the same port.

* `POST /v1`: a JSON array of tasks, `Authorization: Bearer KEY`; the answer is `{"data": [...]}`,
  or `{"errors": [...]}` when any task failed (never both: the new SDK reads one or the other).
* WebSocket `/v1`: an `authentication` task first (a `connectionSessionUUID` resumes a session),
  then any tasks; each task is answered in its own frame as soon as it is done, so a ping is
  answered while an inference runs.
* `GET /v1/images/<imageUUID>.<ext>?expires=..&signature=..`: stored images (results and uploads),
  by the signed URLs the answers hand out (flowgen.serve.urls) or with the owning key's Bearer.
* `GET /v1/stats`: the batcher's queue depth and batch sizes (JSON; the same Bearer key as REST).

Accepting a task runs in a thread pool of its own (validation may fetch URLs and decode images);
answers read the store in anyio's threads; results come from the batcher's futures. The app never
raises to the client: every problem, an unexpected one included, is an error item naming its task,
and a WebSocket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowgen.engine import ModelCard
from flowgen.net.policy import DestinationPolicy
from flowgen.serve.auth import KeyCheck, bearer_key, key_digest
from flowgen.serve.inputs import ImageInputs, InputLimits
from flowgen.serve.protocol import (
    MIME_TYPES,
    BodyErrors,
    ProtocolError,
    check_task_size,
    errors_frame,
    parse_tasks,
    task_type_of,
)
from flowgen.serve.store import Store
from flowgen.serve.tasks import MAX_UNFINISHED_PER_KEY, ServedModels, TaskService

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_TASKS_PER_KEY = MAX_UNFINISHED_PER_KEY  # imageInference tasks one API key may have unfinished at once
# Threads for the blocking part of accepting a task (fetching, decoding and storing its images,
# resolving LoRAs): a pool of their own, so however many a client sends, the threads that answer
# getResponse, stats and image files (anyio's) stay free, and ping never leaves the event loop.
INPUT_WORKERS = 32  # fetches wait on the network: 8 keys x 4 fetches in flight (inputs.py) before one queues

log = logging.getLogger("flowgen.serve")


class Server:
    """The app's state: the task service, the key check and the limits."""

    def __init__(self, service: TaskService, keys: KeyCheck, max_body: int, input_workers: int = INPUT_WORKERS):
        self.service, self.keys, self.max_body = service, keys, max_body
        self.inputs_pool = ThreadPoolExecutor(input_workers, thread_name_prefix="flowgen-serve-inputs")

    def close(self) -> None:
        self.inputs_pool.shutdown(wait=True, cancel_futures=True)

    # --- one task, either transport ----------------------------------------------------------

    async def run_task(self, task: Any, base_url: str, key: str) -> tuple[list[dict], list[ProtocolError]]:
        """(data items, errors) of one task other than authentication, sent with API key `key`.
        Never raises: an unexpected failure is this task's `internalError` (logged in full)."""
        try:
            return await self._run_task(task, base_url, key_digest(key)), []
        except ProtocolError as err:
            return [], [err.for_task(task)]
        except Exception as err:  # one task fails, the connection and the server stay
            log.exception("flowgen serve: an unexpected error in a task")
            return [], [_internal(err).for_task(task)]

    async def _run_task(self, task: Any, base_url: str, owner: str) -> list[dict]:
        check_task_size(task)
        task_type = task_type_of(task)
        if task_type == "ping":
            return [{"taskType": "ping", "pong": True}]
        if task_type == "imageInference":
            done = await self._inputs(self.service.image_inference, task, base_url, owner=owner)
            uuid = task["taskUUID"].lower()
            if task.get("deliveryMethod") == "async":
                return [{"taskType": "imageInference", "taskUUID": uuid}]
            # shielded: a client that leaves cancels its wait, never the task (nor other waiters)
            await asyncio.shield(asyncio.wrap_future(done))
            return await anyio.to_thread.run_sync(lambda: self.service.answer(uuid, base_url, owner=owner))
        if task_type in ("imageUpload", "mediaStorage"):
            upload = self.service.image_upload if task_type == "imageUpload" else self.service.media_storage
            uuid = await self._inputs(upload, task, owner=owner)
            return await anyio.to_thread.run_sync(lambda: self.service.answer(uuid, base_url, owner=owner))
        if task_type == "getResponse":
            uuid = task.get("taskUUID")
            if not isinstance(uuid, str):
                raise ProtocolError(
                    "invalidTaskUUID",
                    "taskUUID: the task to answer for is required",
                    parameter="taskUUID",
                    task_type="getResponse",
                )
            return await anyio.to_thread.run_sync(
                lambda: self.service.answer(uuid.lower(), base_url, owner=owner, polled=True)
            )
        raise ProtocolError(
            "invalidTask",
            "authentication is a WebSocket task; REST sends Authorization: Bearer KEY",
            task_type=task_type,
        )

    async def _inputs(self, work, *args, **kwargs):
        """`work(*args, **kwargs)` on the input pool (see INPUT_WORKERS)."""
        return await asyncio.get_running_loop().run_in_executor(self.inputs_pool, lambda: work(*args, **kwargs))

    # --- REST --------------------------------------------------------------------------------

    async def rest(self, request: Request) -> Response:
        try:
            return await self._rest(request)
        except Exception as err:  # a protocol error, never a plain-text 500
            log.exception("flowgen serve: an unexpected error in a request")
            return _errors([_internal(err)])

    async def _rest(self, request: Request) -> Response:
        if not self.keys.accepts(bearer_key(request.headers.get("authorization"))):
            return _errors(
                [
                    ProtocolError(
                        "invalidApiKey",
                        "invalid API key: send Authorization: Bearer KEY with a key this server accepts",
                        http_status=401,
                    )
                ]
            )
        try:
            body = await self._body(request)
            tasks = parse_tasks(body)
        except ProtocolError as err:
            return _errors([err])
        except BodyErrors as err:
            return _errors(err.errors)
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
        return ProtocolError(
            "requestTooLarge",
            f"the request body is over the {self.max_body:,}-byte limit ({size:,} bytes or more)",
            http_status=413,
        )

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
            data, errors = await self.run_task(
                {"taskType": "getResponse", "taskUUID": task_uuid}, _base_url(websocket), authenticated or ""
            )
            await send(errors_frame(errors) if errors else {"data": data})

        async def handle(text: str | bytes) -> None:
            nonlocal authenticated
            if len(text) > self.max_body:
                await send(errors_frame([self._too_large(len(text))]))
                return
            try:
                tasks = parse_tasks(text)
            except ProtocolError as err:
                await send(errors_frame([err]))
                return
            except BodyErrors as err:
                await send(errors_frame(err.errors))
                return
            for task in tasks:
                if isinstance(task, dict) and task.get("taskType") == "authentication":
                    frame, accepted = self._authenticate(task)
                    authenticated = accepted if accepted is not None else authenticated
                    await send(frame)
                elif authenticated is None:
                    await send(
                        errors_frame(
                            [
                                ProtocolError(
                                    "unauthenticated", "send an authentication task with your apiKey first"
                                ).for_task(task)
                            ]
                        )
                    )
                else:
                    job = asyncio.create_task(answer(task))
                    running.add(job)
                    job.add_done_callback(running.discard)

        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text: str | bytes = message.get("text") or message.get("bytes") or b""
                try:
                    await handle(text)
                except Exception as err:  # a frame fails; the connection and what it is owed stay
                    log.exception("flowgen serve: an unexpected error in a WebSocket frame")
                    await send(errors_frame([_internal(err)]))
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
            error = ProtocolError(
                "invalidApiKey",
                "invalid API key: this server does not accept it",
                parameter="apiKey",
                task_type="authentication",
            )
            return errors_frame([error]), None
        key = key if isinstance(key, str) else ""
        resumed = task.get("connectionSessionUUID")
        session = self.service.store.open_session(key, resumed if isinstance(resumed, str) else None)
        return {"data": [{"taskType": "authentication", "connectionSessionUUID": session}]}, key

    # --- stats -------------------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        """The batcher's counters (queue depth, batches, images, mean and max batch size)."""
        if not self.keys.accepts(bearer_key(request.headers.get("authorization"))):
            return _errors(
                [
                    ProtocolError(
                        "invalidApiKey",
                        "invalid API key: send Authorization: Bearer KEY with a key this server accepts",
                        http_status=401,
                    )
                ]
            )
        return JSONResponse(self.service.batcher.stats())

    # --- images ------------------------------------------------------------------------------

    async def image(self, request: Request) -> Response:
        """An image file, for a URL this server signed (flowgen.serve.urls) or a key that owns it;
        anything else is answered as if there were no such image."""
        name = request.path_params["name"]
        uuid, _, ext = name.rpartition(".")
        store = self.service.store
        stored = store.image(uuid) if uuid else None
        signed = store.urls.verify(name, request.query_params.get("expires"), request.query_params.get("signature"))
        if signed is None and stored is not None:
            key = bearer_key(request.headers.get("authorization"))
            signed = (
                True
                if key is not None and self.keys.accepts(key) and store.owns_image(stored.image_uuid, key_digest(key))
                else None
            )
        if signed is None or stored is None or stored.ext != ext.lower() or not stored.path.exists():
            return JSONResponse(
                {"errors": [{"code": "imageNotFound", "message": f"no image {name} here"}]}, status_code=404
            )
        if not signed or (stored.expires is not None and stored.expires < time.time()):
            return JSONResponse(
                {
                    "errors": [
                        {
                            "code": "imageExpired",
                            "message": f"image {name}: its URL has "
                            "expired (getResponse hands out a fresh one within the task's ttl)",
                        }
                    ]
                },
                status_code=410,
            )
        return FileResponse(stored.path, media_type=MIME_TYPES.get(stored.ext, "application/octet-stream"))


def create_app(
    *,
    batcher: Any,
    data_dir: str | Path,
    models: Iterable[ModelCard],
    keys: frozenset[str] = frozenset(),
    max_body: int = MAX_BODY_BYTES,
    max_tasks_per_key: int = MAX_TASKS_PER_KEY,
    input_limits: InputLimits = InputLimits(),
    destinations: DestinationPolicy | None = None,
) -> Starlette:
    """The ASGI app. The batcher belongs to the app from here: closing the app closes it.
    `destinations`: where reference URLs and deliveries may connect (default: public addresses
    plus $FLOWGEN_ALLOW_HOSTS)."""
    store = Store(data_dir)
    inputs = ImageInputs(store, input_limits, destinations=destinations)
    service = TaskService(
        store,
        batcher,
        ServedModels(models),
        inputs,
        delivery_options={"destinations": destinations},
        max_unfinished=max_tasks_per_key,
    )
    server = Server(service, KeyCheck(keys), max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await anyio.to_thread.run_sync(server.close)  # no task is being accepted any more
        await anyio.to_thread.run_sync(service.close)  # finish or fail every accepted task
        store.close()

    app = Starlette(
        routes=[
            Route("/v1", server.rest, methods=["POST"]),
            WebSocketRoute("/v1", server.websocket),
            Route("/v1/stats", server.stats, methods=["GET"]),
            Route("/v1/images/{name}", server.image, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app


def _internal(err: Exception) -> ProtocolError:
    """The protocol error of an unexpected failure (the full trace goes to the server's log)."""
    return ProtocolError(
        "internalError",
        f"the server failed on this request ({type(err).__name__}); it was not run, and the server keeps serving",
        http_status=500,
    )


def _errors(errors: list[ProtocolError]) -> JSONResponse:
    status = max(error.http_status for error in errors)
    return JSONResponse(errors_frame(errors), status_code=status)


def _base_url(connection: HTTPConnection) -> str:
    """http(s)://host:port of this request, for imageURL (a WebSocket's ws:// becomes http://)."""
    url = connection.url
    scheme = "https" if url.scheme in ("https", "wss") else "http"
    return f"{scheme}://{url.netloc}"
