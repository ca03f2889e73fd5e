"""The HTTP ingress: the FastAPI app (page, /v1/health, /v1/models, /v1/extract, /v1/predict; with
a gallery /v1/gallery/{person}, /v1/identify, /v1/verify) behind Ray Serve. With FACEDIST_API_TOKEN
set (read when a replica starts), every endpoint but the page, /v1/health and the docs needs
"Authorization: Bearer <token>"."""

import asyncio
import collections
import contextlib
import functools
import hmac
import html
import math
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from ray import serve
from ray.exceptions import ActorDiedError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from facedist.serving.errors import ApiError, decode_error_to_api, install_error_handlers, overloaded
from facedist.serving.schemas import (ERROR_RESPONSES, ExtractResponse, PredictResponse, Upload, extraction_response,
                                      multipart_doc, prediction_response)
from facedist.serving.settings import API_TOKEN_ENV, API_VERSION, ServeSettings

api = FastAPI(
    title="facedist",
    version=API_VERSION,
    description="3DMM face analysis: coefficients from one photo, identity/gender/expressions "
                "from one or several photos of a person. Images are multipart uploads. Errors are "
                '{"error": {"code", "message"}} with a 4xx status.',
)
install_error_handlers(api)

# The header a client lowers its request's deadline with (seconds; request_timeout_s is the most).
# Not Ray's x-request-timeout-seconds: that one sets the HTTP proxy's own timeout (and 0 turns it off).
TIMEOUT_HEADER = "X-Request-Timeout"


@functools.lru_cache(maxsize=1)
def _page_template() -> str:
    from importlib.resources import files

    return (files("facedist") / "web" / "index.html").read_text(encoding="utf-8")


def index_page(root_path: str) -> str:
    """The web page with <base href> set to where the app is mounted, so its relative fetch URLs
    (v1/extract, ...) work under any route prefix."""
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return _page_template().replace('<base href="./">', f'<base href="{base}">', 1)


async def call_with_replica_retries(method, args: tuple, retries: int, backoff_s: float):
    """method.remote(*args), sent again when the replica it reached was lost. Until Serve's
    controller sees a dead node's replicas go, the router can still pick them (ActorUnavailable /
    ActorDied); each failure takes that replica out of the router's choice, so a repeat lands on a
    live one. Bounded: after `retries` repeats the RayActorError propagates (answered as a 503),
    and after an ActorDiedError only one repeat is made (a request that crashed its replica
    itself must not crash every replica in turn)."""
    died = 0
    for attempt in range(retries + 1):
        response = method.remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            # The request's deadline passed or a sibling call failed: the call is withdrawn from
            # the queue (or the replica) rather than computed for nobody.
            response.cancel()
            raise
        except RayActorError as exc:
            died += isinstance(exc, ActorDiedError)
            if attempt == retries or died > 1:
                raise
            await asyncio.sleep(backoff_s * (attempt + 1))


async def call_model(method, args: tuple, settings: ServeSettings, admission: "Admission"):
    """A model call (call_with_replica_retries); a full model queue (the deployment's
    max_queued_requests at this caller: Serve's BackPressureError, before any model work) is
    answered 503 overloaded like a full ingress. Converted here: Serve answers a
    BackPressureError that reaches the app with its own plain-text 503, over any handler."""
    try:
        return await call_with_replica_retries(method, args, settings.replica_retries,
                                               settings.replica_retry_backoff_s)
    except BackPressureError:
        raise admission.turn_away("a model's queue is full") from None


async def gather_or_cancel(calls) -> list:
    """The calls' results in order; when one fails the others are cancelled (gather alone lets
    them run on, doing work nobody will read)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones


def request_budget(request: Request, default_s: float) -> float:
    """Seconds this request may take: request_timeout_s, or less when the client's
    X-Request-Timeout header asks for less (a larger or malformed value is ignored)."""
    value = request.headers.get(TIMEOUT_HEADER)
    try:
        asked = float(value) if value is not None else default_s
    except ValueError:
        return default_s
    return min(asked, default_s) if asked > 0 else default_s


class Admission:
    """The ingress's limit on the work it has accepted, counted in images, so a request of many
    photos weighs what it costs: a request takes one slot when it arrives (before its upload is
    read) and one more per further image once the upload is parsed (before any model work); all
    but one go back once its images are extracted (Ticket.images_extracted). It
    is let in on arrival only if the images a request has brought lately (a running mean) fit:
    otherwise requests of several photos would be let in, have their uploads parsed, and then be
    turned away for their further images, the dearest way to say no.

    Past `limit` a request is turned away: 503 "overloaded" with a Retry-After that hands each
    turned-away client its own later second, like appointments: the clients already told to wait
    (whose Retry-After has not run out), this one included, divided by the requests finished per
    second over the last RATE_WINDOW_S (at least `limit` in that window), from min to max seconds. They then come back
    at about the rate work is done instead of all at once: on a small machine answering a 503
    costs nearly as much HTTP work as an answer, and clients that all retry every second would
    keep the front end saturated and every 503 slow."""

    RATE_WINDOW_S = 5.0
    IMAGES_MEAN_WEIGHT = 0.1  # of the latest request in the running mean of images per request

    def __init__(self, limit: int, min_retry_after_s: int, max_retry_after_s: int, clock=time.monotonic):
        self.limit, self.min_retry_after_s, self.max_retry_after_s = limit, min_retry_after_s, max_retry_after_s
        self.held = 0
        self.images_per_request = 1.0
        self.clock = clock
        self._waiting: collections.deque[float] = collections.deque()   # when each told client returns
        self._finished: collections.deque[float] = collections.deque()  # when served requests finished

    def admit(self) -> None:
        """A request arrives: hold its first slot if the images requests bring (the running mean,
        at most the limit, so an idle ingress takes anything) fit, or raise the 503."""
        self._check_room(min(self.limit, max(1, round(self.images_per_request))))
        self.held += 1

    def take(self, slots: int) -> None:
        """Hold `slots` more, or raise the 503 (holding nothing more)."""
        self._check_room(slots)
        self.held += slots

    def _check_room(self, slots: int) -> None:
        if self.held + slots > self.limit:
            raise self.turn_away(f"{self.held} of {self.limit} image slots in use")

    def turn_away(self, why: str) -> ApiError:
        """The 503 overloaded for one client, with its Retry-After."""
        return overloaded(why, self._retry_after())

    def give_back(self, slots: int) -> None:
        """Slots a request no longer needs before it ends (Ticket.images_extracted)."""
        self.held -= slots

    def release(self, slots: int, images: int = 1, served: bool = True) -> None:
        """A request ended: its slots come back, its image count joins the running mean, and if it
        was served (not turned away after it was let in) it counts toward the rate of work done."""
        self.held -= slots
        self.images_per_request += self.IMAGES_MEAN_WEIGHT * (images - self.images_per_request)
        if served:
            self._finished.append(self.clock())

    def _retry_after(self) -> int:
        now = self.clock()
        while self._waiting and self._waiting[0] <= now:
            self._waiting.popleft()
        while self._finished and self._finished[0] < now - self.RATE_WINDOW_S:
            self._finished.popleft()
        # Before any request finished (a burst on an idle replica) the rate is unknown: assume
        # the slots' worth finishes within the window.
        rate = max(self.limit, len(self._finished)) / self.RATE_WINDOW_S
        wait = math.ceil((len(self._waiting) + 1) / rate)
        wait = min(self.max_retry_after_s, max(self.min_retry_after_s, wait))
        # Kept in return order (appointments only grow while the rate holds; a rare earlier one
        # only makes the count a little high for a while).
        self._waiting.append(max(now + wait, self._waiting[-1] if self._waiting else 0.0))
        return wait


class Ticket:
    """One admitted request: the slots it holds and its deadline."""

    def __init__(self, admission: Admission, deadline: asyncio.Timeout):
        self.admission, self.deadline, self.slots, self.images = admission, deadline, 1, 1

    def hold_images(self, count: int) -> None:
        """The parsed upload has `count` images: hold a slot for each (one is held already)."""
        self.images = count
        if count > self.slots:
            self.admission.take(count - self.slots)
            self.slots = count

    def images_extracted(self) -> None:
        """The images are through the extractor, the work the slots stand for: all but one slot go
        back now, so requests waiting on the (much lighter) recognizer do not keep the next
        requests' images from the extractor. The last slot is held until the request ends."""
        if self.slots > 1:
            self.admission.give_back(self.slots - 1)
            self.slots = 1

    def seconds_left(self) -> float:
        return max(0.0, self.deadline.when() - asyncio.get_running_loop().time())


# Note: everything the ingress methods use must be defined above the class: @serve.ingress
# captures the FastAPI app (with these methods) when the class is made.
@serve.deployment(name="FacedistAPI")
@serve.ingress(api)
class FacedistAPI:
    """Checks auth and limits, parses the multipart upload, fans single encoded images out to the
    extractor (images of concurrent requests land in one batch) and answers a bad upload with
    its own 4xx (what is plainly no image, before any model work)."""

    def __init__(self, extractor, recognizer, settings: dict, gallery=None):
        self.settings = ServeSettings(**settings)
        self.extractor = extractor
        self.recognizer = recognizer if self.settings.models_uri else None
        self.gallery = gallery  # facedist.gallery.service.FaceGallery, when serving a gallery
        # Read once, at replica start: rotating the token means restarting the replicas.
        self.token = os.environ.get(API_TOKEN_ENV) or None
        s = self.settings
        self.admission = Admission(s.ingress_max_accepted_images or s.max_ongoing_requests,
                                   s.retry_after_s, s.max_retry_after_s)

    # -- admission and deadline: before any upload is read --

    @contextlib.asynccontextmanager
    async def _admitted(self, request: Request):
        """Admit a model request (Admission: or 503 overloaded at once), then bound it by its
        deadline: past it, 504 deadline_exceeded, and its model calls are cancelled."""
        self.admission.admit()
        budget = request_budget(request, self.settings.request_timeout_s)
        ticket = None
        served = True
        try:
            async with asyncio.timeout(budget) as scope:
                ticket = Ticket(self.admission, scope)
                yield ticket
        except TimeoutError:
            raise ApiError(504, "deadline_exceeded",
                           f"no answer within {budget:g} s (request_timeout_s, or the client's "
                           f"{TIMEOUT_HEADER} header); its queued model work was dropped",
                           retry_after_s=self.settings.retry_after_s) from None
        except ApiError as exc:
            served = exc.code != "overloaded"  # turned away for its further images or a full model queue
            raise
        finally:
            if ticket is None:
                self.admission.release(1)
            else:
                self.admission.release(ticket.slots, images=ticket.images, served=served)

    # -- checks shared by the endpoints --

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "wrong bearer token")

    async def _read_uploads(self, request: Request, field_name: str, max_count: int,
                            second_field: str | None = None):
        """The files under one multipart field (or, with second_field, a pair of lists: one per
        field), with every limit checked before any decoding."""
        s = self.settings
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "not_multipart",
                           f"expected a multipart/form-data upload with field '{field_name}', "
                           f"got content-type {content_type or 'none'!r}")
        # Reject an oversized body from its declared length before reading it.
        max_body = s.max_image_bytes * max_count * (2 if second_field else 1) + 64 * 1024
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            raise ApiError(413, "too_large",
                           f"request body is {int(length)} bytes; the limit is {max_body} "
                           f"({max_count} image(s) of at most {s.max_image_bytes} bytes)")
        try:
            form = await request.form(max_files=max_count + 8, max_fields=32)
        except (StarletteHTTPException, MultiPartException) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            if "Too many files" in str(detail):
                raise ApiError(413, "too_many_images",
                               f"too many files; at most {max_count} image(s) per request") from None
            raise ApiError(400, "bad_multipart", f"could not parse the upload: {detail}") from None
        try:
            first = await self._collect(form, field_name, max_count)
            return first if second_field is None else (first, await self._collect(form, second_field, max_count))
        finally:
            await form.close()  # spooled temporary files go now, also after a rejection

    async def _collect(self, form, field_name: str, max_count: int) -> list[Upload]:
        s = self.settings
        items = form.getlist(field_name)
        if not items:
            present = sorted(set(form.keys()))
            raise ApiError(422, "missing_field",
                           f"missing field '{field_name}' (multipart file upload)"
                           + (f"; got fields {present}" if present else ""), field=field_name)
        if len(items) > max_count:
            raise ApiError(413, "too_many_images",
                           f"{len(items)} images; at most {max_count} per request", field=field_name)
        uploads = []
        for index, item in enumerate(items):
            if not isinstance(item, UploadFile):
                raise ApiError(422, "not_a_file",
                               f"field '{field_name}' #{index} is a text value, not a file upload",
                               field=field_name, index=index)
            data = await item.read(s.max_image_bytes + 1)
            if len(data) > s.max_image_bytes:
                raise ApiError(413, "too_large",
                               f"image #{index} ({item.filename}) is larger than {s.max_image_bytes} bytes",
                               field=field_name, index=index)
            uploads.append(Upload(index, item.filename, data))
        return uploads

    async def _call_model(self, method, *args):
        return await call_model(method, args, self.settings, self.admission)

    @staticmethod
    def _check_not_image(upload: Upload) -> None:
        """For an upload whose first bytes are no known image format: the decoder's own 4xx
        (empty, text, HTML, unrecognised), raised here before any model work for the request."""
        from facedist.images import ImageDecodeError, decode_image

        try:
            decode_image(upload.data, max_side=64)  # fails fast on what is not an image
        except ImageDecodeError as exc:
            raise decode_error_to_api(f"{exc}", index=upload.index, filename=upload.filename) from None

    async def _extract(self, uploads: list[Upload], ticket: Ticket, mesh: bool = False) -> list[dict]:
        from facedist.images import sniff_format

        ticket.hold_images(len(uploads))
        # What is plainly no image is turned away first, so a request with one such file costs
        # no model work; a truncated or corrupt image is found by the extractor's decoder.
        for upload in uploads:
            if sniff_format(upload.data) is None:
                await asyncio.to_thread(self._check_not_image, upload)
        # One call per image, all in flight at once: the extractor batches them with other
        # requests. The encoded bytes travel (several times smaller than the decoded pixels) and
        # the extractor decodes; an upload that does not decode comes back marked and is answered
        # here with its 4xx before the request goes on.
        # The deadline travels as wall-clock time: the extractor drops an image still queued
        # when it passed (clocks of a cluster's nodes agree to far less than a request's budget).
        deadline = time.time() + ticket.seconds_left()
        rows = await gather_or_cancel(self._call_model(self.extractor.extract, (u.data, mesh, deadline))
                                      for u in uploads)
        ticket.images_extracted()
        if any(row.get("deadline_exceeded") for row in rows):
            raise asyncio.TimeoutError  # answered 504 by _admitted, like the ingress's own timeout
        for upload, row in zip(uploads, rows):
            if row.get("decode_error"):
                raise decode_error_to_api(row["message"], index=upload.index, filename=upload.filename)
        return rows

    async def _mesh_triangles(self) -> list[list[int]] | None:
        if not hasattr(self, "_triangles"):  # one topology per extractor model: asked for once
            self._triangles = await self.extractor.mesh_triangles.remote()
        return self._triangles

    # -- endpoints --

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        # No token: the page asks for one when the API answers 401.
        return HTMLResponse(index_page(request.scope.get("root_path") or ""))

    @api.get("/v1/health", summary="Liveness and readiness (no token needed)")
    async def health(self) -> dict:
        extractor = await self.extractor.info.remote()
        return {"status": "ok", "extractor": extractor["name"],
                "recognizer": "ready" if self.recognizer is not None else "not_configured"}

    @api.get("/v1/models", summary="Loaded models: names, versions, labels")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        extractor = await self.extractor.info.remote()
        recognizer = await self.recognizer.info.remote() if self.recognizer is not None else None
        return {"api_version": API_VERSION, "extractor": extractor, "recognizer": recognizer,
                "limits": {"max_image_bytes": self.settings.max_image_bytes,
                           "max_images": self.settings.max_images, "max_side": self.settings.extract.max_side}}

    # exclude_unset: "mesh" is left out entirely unless asked for (every other key is always set).
    @api.post("/v1/extract", response_model=ExtractResponse, response_model_exclude_unset=True, responses=ERROR_RESPONSES,
              openapi_extra=multipart_doc("image", many=False),
              summary="3DMM coefficients, landmarks and pose of the main face in one image")
    async def extract(self, request: Request, mesh: bool = False) -> dict:
        self._authorize(request)
        async with self._admitted(request) as ticket:
            uploads = await self._read_uploads(request, "image", max_count=1)
            (row,) = await self._extract(uploads, ticket, mesh=mesh)
            if row["status"] != "ok":
                code = "no_face" if row["status"] == "no_face" else "extraction_failed"
                raise ApiError(422, code, row.get("message") or code, filename=uploads[0].filename)
            body = extraction_response(row, uploads[0].filename)
            if mesh:  # opt-in: the wireframe is a few thousand numbers most clients do not want
                body["mesh"] = ({"vertices": row["mesh2d"], "triangles": await self._mesh_triangles()}
                                if row.get("mesh2d") else None)
            return body

    @api.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
              openapi_extra=multipart_doc("images", many=True),
              summary="Identity (top-k), gender, age and per-image expressions of one person from 1..K images")
    async def predict(self, request: Request) -> dict:
        self._authorize(request)
        async with self._admitted(request) as ticket:
            uploads = await self._read_uploads(request, "images", max_count=self.settings.max_images)
            if self.recognizer is None:
                raise ApiError(503, "not_configured", "no recognition models: start the server with models_uri")
            rows = await self._extract(uploads, ticket)
            if not any(row["status"] == "ok" for row in rows):
                raise ApiError(422, "no_face", "no face found in any of the images: "
                               + "; ".join(f"#{i}: {row.get('message')}" for i, row in enumerate(rows)))
            prediction = await self._call_model(self.recognizer.predict, rows)
            return prediction_response(prediction, rows, uploads)

    # -- the gallery (facedist.gallery): enrol, delete, identify, verify --

    def _need_gallery(self) -> None:
        if self.gallery is None:
            raise ApiError(503, "not_configured", "no gallery: start the server with gallery_uri (--gallery)")

    async def _gallery_call(self, method, *args) -> dict:
        answer = await self._call_model(method, *args)
        if "error" in answer:
            error = answer["error"]
            raise ApiError(error["status"], error["code"], error["message"])
        return answer

    @api.post("/v1/gallery/{person}", responses=ERROR_RESPONSES, openapi_extra=multipart_doc("images", many=True),
              summary="Enrol photos of a person into the gallery (no retraining)")
    async def gallery_enroll(self, request: Request, person: str) -> dict:
        self._authorize(request)
        async with self._admitted(request) as ticket:
            uploads = await self._read_uploads(request, "images", max_count=self.settings.max_images)
            self._need_gallery()
            rows = await self._extract(uploads, ticket)
            return await self._gallery_call(self.gallery.enroll, person, rows, [u.filename for u in uploads])

    @api.delete("/v1/gallery/{person}", responses=ERROR_RESPONSES,
                summary="Remove every photo of a person from the gallery; says what was removed")
    async def gallery_delete(self, request: Request, person: str) -> dict:
        self._authorize(request)
        self._need_gallery()
        return await self._gallery_call(self.gallery.delete, person)

    @api.get("/v1/gallery", summary="The gallery: people, photos, the embedding and its threshold")
    async def gallery_info(self, request: Request) -> dict:
        self._authorize(request)
        self._need_gallery()
        return await self.gallery.info.remote()

    @api.post("/v1/identify", responses=ERROR_RESPONSES, openapi_extra=multipart_doc("images", many=True),
              summary="Photos of one unknown person -> the best enrolled matches; 'unknown' below the threshold")
    async def identify(self, request: Request, k: int | None = None) -> dict:
        self._authorize(request)
        async with self._admitted(request) as ticket:
            uploads = await self._read_uploads(request, "images", max_count=self.settings.max_images)
            self._need_gallery()
            rows = await self._extract(uploads, ticket)
            return await self._gallery_call(self.gallery.identify, rows, [u.filename for u in uploads], k)

    @api.post("/v1/verify", responses=ERROR_RESPONSES,
              summary="Two sets of photos (fields 'a' and 'b') -> the same person or not, and the score")
    async def verify(self, request: Request) -> dict:
        self._authorize(request)
        async with self._admitted(request) as ticket:
            a, b = await self._read_uploads(request, "a", max_count=self.settings.max_images, second_field="b")
            self._need_gallery()
            rows = await self._extract(a + b, ticket)
            return await self._gallery_call(self.gallery.verify, rows[:len(a)], rows[len(a):],
                                             [u.filename for u in a], [u.filename for u in b])
