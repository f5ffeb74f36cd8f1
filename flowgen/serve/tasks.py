"""What each task does, transport-free: validate, record, submit to the batcher, answer.

imageInference goes through the recipe layer's own rules (flowgen.recipe.validation, in the order
flowgen.recipe.expansion applies them to an item), so a task gets the one-line messages a recipe
with the same fields would. Its input images are first stored (inputs.py) and named by their
stored path, which is what a recipe's reference files are. Seeds: a fixed `seed` gives seed + i
(flowgen.plan.seeds, as recipes); none gives a random base in the unsigned 32-bit range, as the
spec says, and base + i (recipes keep their derived seeds: changing them would re-render folders).

Every task belongs to the key that sent it (`owner`, flowgen.serve.auth.key_digest): another key
is answered as if it did not exist, and a taskUUID in use (by another key, or by a task of another
type) is refused. A task a stopped server interrupted runs anew when its key sends it again with
the same taskUUID. At most `max_unfinished` imageInference tasks per key are unfinished at once,
counted when a task is accepted (a task refused by validation never counts).

A validated task is read once into a flowgen.plan.task.ResolvedTask, as the planner reads a
recipe item's (its Job, with LoRAs resolved as a recipe's are, so tasks with different LoRA sets
never share a batch; its Delivery; numberResults; seed). A result is finished as runs finish
theirs (flowgen.run.render: face pass, content check, encode); webhookURL / uploadEndpoint go
through the runs' dispatcher (deliveries.py). What is the server's own: validation's protocol
errors, the task store, the answers.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowgen.engine import MAX_SERVE_INPUT_PIXELS, ModelCard
from flowgen.errors import FlowgenError
from flowgen.net.redact import redacted_task
from flowgen.plan.compile import extension_for, guidance_for
from flowgen.plan.loras import LoraResolver
from flowgen.plan.seeds import result_seed
from flowgen.plan.task import ResolvedTask
from flowgen.recipe.expansion import base_defaults
from flowgen.recipe.spec import MAX_REFERENCES
from flowgen.recipe.validation import (
    clean_task,
    find_card,
    merge_tasks,
    merged_problems,
    task_problems,
)
from flowgen.run.faces import load_detector
from flowgen.run.references import ReferenceLoader
from flowgen.run.render import finish_image
from flowgen.serve.deliveries import ServeDeliveries, finished_for
from flowgen.serve.inputs import ImageInputs
from flowgen.serve.protocol import (
    ProtocolError,
    output_value,
    problem_error,
    task_uuid_of,
)
from flowgen.serve.store import Store, StoredImage

if TYPE_CHECKING:
    from flowgen.safety import ContentChecker  # imported on first use (NudeNet, onnxruntime)

SHUTDOWN = "the server shut down before this task finished; send it again (the same taskUUID runs it anew)"
MAX_UNFINISHED_PER_KEY = 64  # imageInference tasks one API key may have unfinished at once
SEED_RANGE = 2**32  # a served task without a seed: the spec's "random seed ... in the unsigned 32-bit range"
URL_FIELDS = {"uploadEndpoint": "upload", "webhookURL": "webhook"}  # task field -> the sink sending to it


# The embedded tiny model has no Runware AIR id; clients that insist on the AIR form (runware-sdk
# looks a non-AIR model up on the internet) name it by this one.
TINY_AIR = "flowgen:1@1"


class ServedModels:
    """The model cards this server answers to, by card name, AIR id or HF repo (as recipes name them)."""

    def __init__(self, cards: Iterable[ModelCard]):
        self.cards = {card.name: card for card in cards}
        tiny = [card for card in self.cards.values() if card.tiny is not None and not card.air]
        self.aliases = {TINY_AIR: tiny[-1]} if tiny else {}  # the tiny card without an AIR answers to TINY_AIR

    def label(self, card: ModelCard) -> str:
        """The id results and messages name a card by: its AIR (the tiny model's is TINY_AIR)."""
        return card.air or (TINY_AIR if card.tiny is not None else card.name)

    def card_for(self, model: Any, task_uuid: str) -> ModelCard:
        served = ", ".join(self.label(card) for card in self.cards.values())
        if not isinstance(model, str) or not model.strip():
            raise ProtocolError(
                "invalidModel",
                f"model: required (served here: {served})",
                parameter="model",
                task_type="imageInference",
                task_uuid=task_uuid,
            )
        if model.strip().lower() in self.aliases:
            return self.aliases[model.strip().lower()]
        card, _ = find_card(model)
        if card is None or card.name not in self.cards:
            raise ProtocolError(
                "invalidModel",
                f"model: {model!r} is not served here; served: {served}",
                parameter="model",
                task_type="imageInference",
                task_uuid=task_uuid,
            )
        return card


@dataclass
class _Running:
    """An accepted imageInference task while its results come back from the batcher."""

    task_uuid: str
    expected: int
    resolved: ResolvedTask  # the task read once: its Job, its Delivery
    owner: str = ""  # key_digest of the key that sent it
    model: str = ""  # how results name the model (ServedModels.label)
    base_url: str | None = None  # where this server serves images (the webhook's imageURL)
    done: Future = field(default_factory=Future)  # resolves (to None) once every result is recorded
    finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TaskService:
    def __init__(
        self,
        store: Store,
        batcher: Any,
        models: ServedModels,
        inputs: ImageInputs,
        delivery_options: dict | None = None,
        max_unfinished: int = MAX_UNFINISHED_PER_KEY,
    ):
        self.store, self.batcher, self.models, self.inputs = store, batcher, models, inputs
        self.max_unfinished = max_unfinished
        self.references = ReferenceLoader(max_pixels=MAX_SERVE_INPUT_PIXELS)  # clients' images: the lower limit
        self.loras = LoraResolver()
        self.deliveries = ServeDeliveries(store, **(delivery_options or {}))
        self.deliveries.resend_pending()  # what a stopped server left undelivered: once more
        self._checker: ContentChecker | None = None  # loaded once a task asks for one
        self._running: dict[str, _Running] = {}
        self._unfinished: Counter[str] = Counter()  # owner -> accepted imageInference tasks not yet final
        self._lock = threading.Lock()

    # --- imageInference ----------------------------------------------------------------------

    def image_inference(self, raw: dict[str, Any], base_url: str | None = None, *, owner: str) -> Future:
        """Validate and submit a task of `owner` (a key digest); a Future that resolves when the
        task's record is final (answer it with `answer`). Raises ProtocolError for a task that is
        not accepted. A taskUUID its key already sent is not run twice: its record answers (clients
        retry with the same UUID), unless a stopped server interrupted it: then it runs anew."""
        task_uuid = task_uuid_of(raw, "imageInference")
        existing = self._existing(task_uuid, "imageInference", owner)
        if existing is not None:
            return existing
        self._check_unfinished(owner, task_uuid)  # cheap, before any fetch; _accept checks again
        card = self.models.card_for(raw.get("model"), task_uuid)
        task, paths, hashes = self._validated(raw, card, task_uuid, owner)
        try:
            loras = self.loras(task)
        except FlowgenError as err:  # a LoRA file that changed or vanished since the check above
            raise problem_error(str(err), "imageInference", task_uuid) from None
        # read once, as the planner reads a recipe item's task (flowgen.plan.compile)
        resolved = ResolvedTask.from_task(
            task, guidance=guidance_for(task, card.distilled), references=paths, reference_hashes=hashes, loras=loras
        )
        job, delivery = resolved.job, resolved.delivery
        if job.face_pass is not None:
            try:
                load_detector()  # no detector here: refused now, not after rendering
            except FlowgenError as err:
                raise ProtocolError(
                    "unsupportedParameter",
                    f"task.ultralytics: {err}",
                    parameter="ultralytics",
                    task_type="imageInference",
                    task_uuid=task_uuid,
                ) from None
        count = resolved.number_results
        seed = resolved.seed
        if seed is None:  # consecutive from a random base, all in range (as a fixed seed gives seed + i)
            seed = secrets.randbelow(SEED_RANGE - count + 1)
        seeds = [result_seed(seed, None, task_uuid, i) for i in range(count)]
        try:
            decoded = self.references.load_all(paths)
        except ValueError as err:
            raise ProtocolError(
                "invalidReferenceImages",
                str(err),
                parameter="inputs.referenceImages",
                task_type="imageInference",
                task_uuid=task_uuid,
            ) from None
        if delivery.check_content:
            self._content_checker(task_uuid)  # unavailable: refused now, not after rendering
        label = self.models.label(card)
        # what the store keeps of the task, for its answers and a resend after a restart
        request = {
            "model": label,
            "outputType": delivery.output_type,
            "ext": extension_for(job.output_format),
            "outputQuality": job.output_quality,
            "includeCost": delivery.include_cost,
            "ttl": delivery.ttl,
            "checkContent": delivery.check_content,
            "webhookURL": delivery.webhook_url,
            "uploadEndpoint": delivery.upload_endpoint,
            "baseURL": base_url,
        }  # where the server answering it serves images (a resend's webhook)
        running = _Running(task_uuid, count, resolved, owner, label, base_url)
        with self._lock:
            self._check_unfinished(owner, task_uuid)
            accepted = self.store.accept(task_uuid, "imageInference", _stored_request(request), count, owner)
            if accepted:
                self._running[task_uuid] = running
                self._unfinished[owner] += 1
        if not accepted:  # the same UUID was taken meanwhile (a client retrying at once)
            return self._existing(task_uuid, "imageInference", owner) or _done()
        for index, seed in enumerate(seeds):
            try:
                future = self.batcher.submit(card.name, job, seed, decoded)
            except Exception as err:
                self._failed(running, err)
                break
            future.add_done_callback(lambda f, i=index, s=seed: self._result(running, request, i, s, f))
        return running.done

    def _existing(self, task_uuid: str, task_type: str, owner: str) -> Future | None:
        """The Future of `owner`'s task `task_uuid` when it was sent before (None: run it, as new
        or anew after an interruption); ProtocolError when the UUID is another key's or another
        task type's (the same words for both, so another key learns nothing of the task)."""
        with self._lock:
            running = self._running.get(task_uuid)
            record = self.store.task(task_uuid)
        if record is None:
            return None
        if record["owner"] != owner or record["taskType"] != task_type:
            raise ProtocolError(
                "invalidTaskUUID",
                f"taskUUID: {task_uuid} is already in use; every task needs a new UUID",
                parameter="taskUUID",
                task_type=task_type,
                task_uuid=task_uuid,
            )
        if record["interrupted"]:
            return None
        return running.done if running is not None else _done()

    def _check_unfinished(self, owner: str, task_uuid: str) -> None:
        if self._unfinished[owner] >= self.max_unfinished:
            raise ProtocolError(
                "tooManyRequests",
                f"this API key already has {self.max_unfinished} unfinished "
                "imageInference tasks; wait for some to finish",
                task_type="imageInference",
                task_uuid=task_uuid,
                http_status=429,
            )

    def _validated(
        self, raw: dict[str, Any], card: ModelCard, task_uuid: str, owner: str
    ) -> tuple[dict, list[str], list[str]]:
        """The task as a recipe item's resolved task: defaults merged, every rule applied."""
        task = {k: v for k, v in raw.items() if k != "referenceImages"}
        for name in ("webhookURL", "uploadEndpoint"):
            if isinstance(task.get(name), str):
                try:
                    self.deliveries.check_destination(task[name])  # http(s), and no literal internal address
                except ValueError as err:
                    raise ProtocolError(
                        "invalid" + name[:1].upper() + name[1:],
                        f"task.{name}: {err}",
                        parameter=name,
                        task_type="imageInference",
                        task_uuid=task_uuid,
                    ) from None
        references = _reference_inputs(raw, task_uuid)
        if len(references) > MAX_REFERENCES:
            references = []  # not fetched: the spec rule below refuses the list as it stands
        stored = []
        for index, value in enumerate(references):
            try:
                stored.append(self.inputs.resolve(value, f"inputs.referenceImages[{index}]", owner=owner))
            except ProtocolError as err:
                err.task_type, err.task_uuid = "imageInference", task_uuid
                raise
        if references:
            inputs = dict(task.get("inputs") or {}) if isinstance(task.get("inputs"), dict) else {}
            inputs["referenceImages"] = [str(image.path) for image in stored]
            task["inputs"] = inputs
        task = merge_tasks(base_defaults(card, card.distilled), task)
        task["model"] = self.models.label(card)
        problems = task_problems(task, "task") + merged_problems(task, "task", task["model"], card.distilled, card)
        if problems:
            raise _problems_error(problems, task_uuid)
        return clean_task(task), [str(image.path) for image in stored], [image.sha256 for image in stored]

    def _result(self, running: _Running, request: dict, index: int, seed: int, future: Future) -> None:
        """A batcher result: the run's finish (face pass, content check, encode: flowgen.run.render),
        then store, record, hand to its sinks (on the batcher's thread; the sinks run in lanes)."""
        job, delivery = running.resolved.job, running.resolved.delivery
        ext = extension_for(job.output_format)
        try:
            result = future.result()
            metadata = {
                "item_id": running.task_uuid,
                "result_index": index,
                "seed": seed,
                "model": running.model,
                "taskUUID": running.task_uuid,
            }
            # the face pass runs on the engine the batcher rendered with, one engine call at a time
            image = finish_image(
                result.engine,
                job,
                seed,
                result.pixels,
                ext=ext,
                metadata=metadata,
                engine_seconds=result.engine_seconds,
                checker=self._checker if delivery.check_content else None,
                include_cost=delivery.include_cost,
                engine_lock=self.batcher.engine_lock,
            )
            stored = self.store.put_image(image.data, ext, delivery.ttl, owner=running.owner)
            url = self.store.image_url(running.base_url, stored) if running.base_url else None
            finished = finished_for(
                running.task_uuid,
                index,
                request,
                {"imageUUID": stored.image_uuid, "seed": seed, "cost": image.cost, "NSFWContent": image.nsfw},
                stored.path,
                url,
                running.owner,
            )
            self.store.add_result(
                running.task_uuid,
                index,
                stored.image_uuid,
                seed,
                image.cost,
                image.nsfw,
                sinks=self.deliveries.first_states(finished),
            )
        except Exception as err:
            self._failed(running, err)
            return
        # a task with uploadEndpoint is answered once its uploads are recorded (its imageURL is theirs),
        # or after deliveries.UPLOAD_WAIT_S (its imageURL is this server's): a slow sink never holds it
        self.deliveries.send(finished, on_uploaded=lambda: self._counted(running))

    def _counted(self, running: _Running) -> None:
        """One more of the task's results is final; the last one finishes the task."""
        with running.lock:
            running.finished += 1
            last = running.finished == running.expected
        if last:
            self._finish(running)

    def _content_checker(self, task_uuid: str):
        """The shared content checker (safety.checkContent), loaded on first use; ProtocolError
        when NudeNet cannot run here."""
        if self._checker is None:
            from flowgen.safety import ContentChecker, SafetyUnavailable

            try:
                self._checker = ContentChecker().load()
            except SafetyUnavailable as err:
                raise ProtocolError(
                    "unsupportedParameter",
                    f"task.safety.checkContent: {err}",
                    parameter="safety.checkContent",
                    task_type="imageInference",
                    task_uuid=task_uuid,
                ) from None
        return self._checker

    def _failed(self, running: _Running, err: BaseException) -> None:
        reason = " ".join(str(err).split()) or type(err).__name__
        self.store.fail(
            running.task_uuid,
            [
                {
                    "code": "inferenceFailed",
                    "message": f"the engine failed: {reason}",
                    "taskType": "imageInference",
                    "taskUUID": running.task_uuid,
                }
            ],
        )
        self._finish(running)

    def _finish(self, running: _Running) -> None:
        with self._lock:
            if self._running.pop(running.task_uuid, None) is not None:
                self._unfinished[running.owner] -= 1
                if not self._unfinished[running.owner]:
                    del self._unfinished[running.owner]
        if not running.done.done():
            running.done.set_result(None)

    def accepted(self, task_uuid: str) -> Future | None:
        """A Future that resolves when the accepted task `task_uuid` is final (done already for a
        finished one), or None when no such task was accepted."""
        # both looks under the lock that accept + _running share: else a task accepted between them
        # would read as finished while it is still processing
        with self._lock:
            running = self._running.get(task_uuid)
            if running is not None:
                return running.done
            return _done() if self.store.task(task_uuid) is not None else None

    # --- imageUpload, mediaStorage ------------------------------------------------------------

    def image_upload(self, raw: dict[str, Any], *, owner: str) -> str:
        """Store the image for `owner`; the task's UUID (answer it with `answer`)."""
        return self._upload(raw, "imageUpload", "image", owner)

    def media_storage(self, raw: dict[str, Any], *, owner: str) -> str:
        """runware-sdk's recommended upload (`operation: upload`, the image in `media`): as imageUpload."""
        task_uuid = task_uuid_of(raw, "mediaStorage")
        if raw.get("operation") != "upload":
            shown = "missing" if raw.get("operation") is None else repr(raw.get("operation"))
            raise ProtocolError(
                "unsupportedOperation",
                f"operation: {shown} is not served here; only 'upload' is",
                parameter="operation",
                task_type="mediaStorage",
                task_uuid=task_uuid,
            )
        return self._upload(raw, "mediaStorage", "media", owner)

    def _upload(self, raw: dict[str, Any], task_type: str, field: str, owner: str) -> str:
        task_uuid = task_uuid_of(raw, task_type)
        if self._existing(task_uuid, task_type, owner) is None:
            try:
                image = self.inputs.resolve(raw.get(field), field, owner=owner)
            except ProtocolError as err:
                err.task_type, err.task_uuid = task_type, task_uuid
                raise
            request = {"outputType": "URL", "ext": image.ext}
            if self.store.accept(task_uuid, task_type, request, 1, owner):
                self.store.add_result(task_uuid, 0, image.image_uuid, 0, None)
            else:
                self._existing(task_uuid, task_type, owner)  # taken meanwhile: another key's is an error
        return task_uuid

    # --- answers -----------------------------------------------------------------------------

    def answer(self, task_uuid: str, base_url: str, *, owner: str, polled: bool = False) -> list[dict[str, Any]]:
        """A finished task's data items; raises ProtocolError with the task's own errors, and
        taskNotFound for a task of another key. `polled` (getResponse) marks each item `status:
        success` and answers `status: processing` for a task still running."""
        record = self.store.task(task_uuid)
        if record is None or record["owner"] != owner:
            raise ProtocolError(
                "taskNotFound",
                f"taskUUID: no task {task_uuid} on this server",
                parameter="taskUUID",
                task_type="getResponse",
                task_uuid=task_uuid,
            )
        if record["status"] == "processing":
            return [{"taskType": record["taskType"], "taskUUID": task_uuid, "status": "processing"}]
        if record["status"] == "error":
            first = record["errors"][0] if record["errors"] else {"code": "inferenceFailed", "message": "failed"}
            raise ProtocolError(
                first["code"],
                first["message"],
                parameter=first.get("parameter"),
                task_type=record["taskType"],
                task_uuid=task_uuid,
            )
        return [self._item(record, result, base_url, polled) for result in record["results"]]

    def _item(self, record: dict, result: dict, base_url: str, polled: bool) -> dict[str, Any]:
        request = record["request"]
        image = self.store.image(result["imageUUID"])
        ext = image.ext if image is not None else request.get("ext", "jpg")
        if image is None:  # its row is gone (a cleaned data dir): the URL answers imageNotFound
            image = StoredImage(result["imageUUID"], "", ext, self.store.images_dir / "missing", None)
        url = self.store.image_url(base_url, image)
        if request.get("uploadEndpoint"):  # as runs: the uploaded file's URL, once the upload worked
            url = self.deliveries.store_url(record["taskUUID"], result["resultIndex"]) or url
        if record["taskType"] == "mediaStorage":  # runware-sdk's media shape
            media = {
                "taskType": "mediaStorage",
                "taskUUID": record["taskUUID"],
                "operation": "upload",
                "mediaUUID": result["imageUUID"],
                "mediaURL": url,
            }
            return {**media, "status": "success"} if polled else media
        item: dict[str, Any] = {
            "taskType": record["taskType"],
            "taskUUID": record["taskUUID"],
            "imageUUID": result["imageUUID"],
        }
        output_type = request.get("outputType", "URL")
        data = image.path.read_bytes() if output_type != "URL" and image.path.exists() else b""
        key, value = output_value(output_type, data, ext, url)
        item[key] = value
        if record["taskType"] == "imageInference":
            item["seed"] = result["seed"]
            if request.get("includeCost"):
                item["cost"] = result["cost"]
            if result.get("NSFWContent") is not None:
                item["NSFWContent"] = result["NSFWContent"]
        if polled:
            item["status"] = "success"
        return item

    def close(self) -> None:
        """Finish what the batcher holds, then fail whatever is still not final."""
        self.batcher.close(finish=True)
        self.deliveries.close()  # every sink in flight gives up within its retry policy
        with self._lock:
            left = list(self._running.values())
        for running in left:
            self._finish(running)
        self.store.fail_unfinished(SHUTDOWN)
        self.inputs.close()


def _reference_inputs(raw: dict[str, Any], task_uuid: str) -> list:
    """The task's reference images: `inputs.referenceImages` (the current API) or the older
    top-level `referenceImages`; ProtocolError when the one given is not a list."""
    inputs = raw.get("inputs")
    found, where = (inputs.get("referenceImages"), "inputs.referenceImages") if isinstance(inputs, dict) else (None, "")
    if found is None:
        found, where = raw.get("referenceImages"), "referenceImages"
    if found is None:
        return []
    if not isinstance(found, list):
        raise ProtocolError(
            "invalidReferenceImages",
            f"task.{where}: must be a list of images (imageUUIDs, data "
            f"URIs, base64 or URLs), got {type(found).__name__}",
            parameter=where,
            task_type="imageInference",
            task_uuid=task_uuid,
        )
    return list(found)


def _stored_request(request: dict[str, Any]) -> dict[str, Any]:
    """`request` as the store keeps it: URLs without credentials (flowgen.net.redact: no query
    string or user info, a webhook's path neither), and which fields lost some (the URLs as given
    are kept apart for a resend after a restart: deliveries.ServeDeliveries)."""
    stored = redacted_task(request)
    redacted = [name for name in URL_FIELDS if stored.get(name) != request.get(name)]
    if redacted:
        stored["redacted"] = redacted
    return stored


def _problems_error(problems: list[str], task_uuid: str) -> ProtocolError:
    """The first problem as the task's error (its message says how many more there are)."""
    error = problem_error(problems[0], "imageInference", task_uuid)
    if len(problems) > 1:
        error.message += f" (and {len(problems) - 1} more: " + "; ".join(problems[1:4]) + ")"
    return error


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future
