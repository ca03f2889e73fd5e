"""Overload limits, deadlines and the exposure warning, without a Ray cluster: the settings'
derived bounds, the deployment options they give, the ingress's helpers and the error answers
(a real FastAPI app with the API's error handlers). tests/test_serve.py shows them over HTTP on a
real Serve app; tests/test_serve_shutdown.py the signals."""

from __future__ import annotations

import asyncio

import pytest

from facedist.serving.settings import ServeSettings


def test_extractor_replicas_follow_the_cpus():
    s = ServeSettings(extractor_num_cpus=1.0, ingress_num_cpus=0.25, recognizer_num_cpus=0.25)
    assert s.replicas_that_fit(2) == 1          # 1.5 CPUs left: one whole-CPU replica
    assert s.replicas_that_fit(16) == 15
    assert s.replicas_that_fit(0) == 1          # a CPU-less head: still one (it waits for a node)
    # Half a CPU each still runs one torch thread: two of them on one spare core only take turns.
    assert ServeSettings(extractor_num_cpus=0.5).replicas_that_fit(2) == 1
    assert ServeSettings(extractor_num_cpus=2.0).replicas_that_fit(9) == 4


def test_resolved_settings_fill_every_derived_bound():
    resolved = ServeSettings().resolved(cluster_cpus=2)
    assert resolved.max_replicas == 1
    assert resolved.ingress_max_replicas == 1  # a second front-end would admit twice what one extractor holds
    assert ServeSettings().resolved(cluster_cpus=16).ingress_max_replicas == ServeSettings().ingress_max_replicas
    assert resolved.ingress_max_accepted_images == resolved.max_ongoing_requests
    # An explicit value wins over what is derived.
    explicit = ServeSettings(max_replicas=3, ingress_max_accepted_images=7).resolved(cluster_cpus=2)
    assert (explicit.max_replicas, explicit.ingress_max_accepted_images) == (3, 7)
    assert ServeSettings(num_replicas=2).resolved(None).ingress_max_accepted_images == 2 * 32
    assert ServeSettings().resolved(None).max_replicas == 4  # no cluster known (a config check)


def test_every_deployment_gets_bounded_queues_and_a_short_graceful_shutdown():
    from facedist.serving.app import deployment_options

    s = ServeSettings(max_ongoing_requests=10, max_queued_requests=5, recognizer_max_queued_requests=6,
                      ingress_max_queued_requests=7, retry_after_s=2, shutdown_timeout_s=1.5)
    options = deployment_options(s)
    assert options["FaceExtractor"]["max_ongoing_requests"] == 10
    assert [options[d]["max_queued_requests"] for d in ("FaceExtractor", "FaceRecognizer", "FacedistAPI")] == [5, 6, 7]
    for deployment in options.values():
        assert deployment["backpressure_config"].status_code == 503
        assert deployment["backpressure_config"].retry_after_s == 2
        assert deployment["graceful_shutdown_timeout_s"] == 1.5


@pytest.mark.parametrize("bad", [{"max_queued_requests": 0}, {"max_ongoing_requests": 0},
                                 {"ingress_max_accepted_images": 0}, {"request_timeout_s": 0},
                                 {"max_replicas": 0}, {"retry_after_s": -1}])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServeSettings(**bad)


def test_limits_come_from_serve_run_strings():
    s = ServeSettings.from_args({"max_queued_requests": "-1", "ingress_max_accepted_images": "none",
                                 "request_timeout_s": "2.5"})
    assert (s.max_queued_requests, s.ingress_max_accepted_images, s.request_timeout_s) == (-1, None, 2.5)


def _request(headers: dict):
    from starlette.requests import Request

    return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


@pytest.mark.parametrize("header, expected", [(None, 30.0), ("2.5", 2.5), ("60", 30.0), ("0", 30.0),
                                              ("-1", 30.0), ("soon", 30.0)])
def test_a_client_may_lower_its_deadline_but_not_raise_it(header, expected):
    from facedist.serving.ingress import TIMEOUT_HEADER, request_budget

    headers = {TIMEOUT_HEADER: header} if header is not None else {}
    assert request_budget(_request(headers), 30.0) == expected


def test_a_failed_call_cancels_its_siblings():
    from facedist.serving.ingress import gather_or_cancel

    cancelled = []

    async def slow(i):
        try:
            await asyncio.Event().wait()  # never set: only cancellation ends it
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def fails():
        await asyncio.sleep(0)
        raise ValueError("queue full")

    async def main():
        with pytest.raises(ValueError):
            await gather_or_cancel([slow(0), fails(), slow(2)])
        await asyncio.sleep(0)  # let the cancellations land

    asyncio.run(main())
    assert sorted(cancelled) == [0, 2]


def _app_raising(exc: Exception):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from facedist.serving.errors import install_error_handlers

    api = FastAPI()
    install_error_handlers(api)

    @api.get("/x")
    async def route():
        raise exc

    return TestClient(api, raise_server_exceptions=False)


def test_a_full_model_queue_is_503_overloaded_with_retry_after():
    """Serve raises BackPressureError at the caller when a model's queue is full; the ingress
    answers it as its own overload (Serve would otherwise answer plain text over any handler)."""
    from ray.serve.exceptions import BackPressureError

    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission, call_model

    class FullQueue:
        calls = 0

        def remote(self, *args):
            FullQueue.calls += 1

            async def answer():
                raise BackPressureError(num_queued_requests=16, max_queued_requests=16)

            return answer()

    admission = Admission(limit=4, min_retry_after_s=1, max_retry_after_s=30)
    with pytest.raises(ApiError) as exc:
        asyncio.run(call_model(FullQueue(), ("row",), ServeSettings(), admission))
    assert (exc.value.status, exc.value.code) == (503, "overloaded") and exc.value.retry_after_s >= 1
    assert FullQueue.calls == 1  # not repeated: a full queue is no lost replica


def test_the_ingress_limit_answer_has_the_same_shape():
    from facedist.serving.errors import overloaded

    response = _app_raising(overloaded("32 requests in progress", 1)).get("/x")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"



@pytest.mark.parametrize("host, environ, warns", [("127.0.0.1", {}, False), ("localhost", {}, False),
                                                  ("0.0.0.0", {}, True), ("10.0.0.5", {}, True),
                                                  ("0.0.0.0", {"FACEDIST_API_TOKEN": "t"}, False)])
def test_serving_beyond_loopback_without_a_token_warns(host, environ, warns):
    from facedist.serving.app import exposure_warning

    warning = exposure_warning(host, 8000, environ)
    assert (warning is not None) == warns
    if warns:
        assert "FACEDIST_API_TOKEN" in warning and host in warning


def test_admission_counts_images_and_turns_away_past_its_limit():
    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission

    admission = Admission(limit=4, min_retry_after_s=1, max_retry_after_s=30, clock=lambda: 0.0)
    admission.take(1)
    admission.take(3)  # a parsed request's further images
    with pytest.raises(ApiError) as full:
        admission.take(1)
    assert (full.value.status, full.value.code) == (503, "overloaded") and full.value.retry_after_s >= 1
    assert admission.held == 4  # the refused request holds nothing
    admission.release(3)
    admission.take(1)  # room again once work is done
    assert admission.held == 2


def test_admission_lets_a_request_in_only_when_the_images_requests_bring_fit():
    """Requests of 3 photos: once the running mean knows it, a newcomer is turned away on arrival
    (before its upload is read) when 3 more would not fit, not after its upload is parsed; an idle
    ingress still takes one."""
    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission

    admission = Admission(limit=4, min_retry_after_s=1, max_retry_after_s=30, clock=lambda: 0.0)
    admission.admit()
    admission.admit()  # two held: with one image a request (the start), a third fits
    assert admission.held == 2
    admission.release(1, images=1)
    admission.release(1, images=1)
    for _ in range(40):  # requests of three photos, one after the other
        admission.admit()
        admission.take(2)
        admission.release(3, images=3)
    assert round(admission.images_per_request) == 3
    admission.admit()
    admission.take(1)  # 2 held: 3 more do not fit
    with pytest.raises(ApiError) as full:
        admission.admit()
    assert full.value.code == "overloaded" and admission.held == 2
    admission.release(2, images=3)
    tiny = Admission(limit=2, min_retry_after_s=1, max_retry_after_s=30, clock=lambda: 0.0)
    tiny.images_per_request = 16.0  # more than the limit: an idle ingress still lets one in
    tiny.admit()
    assert tiny.held == 1


def test_a_request_past_the_extractor_keeps_one_slot_until_it_ends():
    """Requests of 3 photos fill a limit of 6; once one's images are extracted (it waits on the
    recognizer), all but one of its slots go back and the next request's images fit."""
    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission, Ticket

    admission = Admission(limit=6, min_retry_after_s=1, max_retry_after_s=30, clock=lambda: 0.0)
    first, second = Ticket(admission, deadline=None), Ticket(admission, deadline=None)  # no deadline used here
    admission.take(2)  # the two requests' first slots (admit)
    first.hold_images(3)
    second.hold_images(3)
    with pytest.raises(ApiError):
        admission.take(3)
    first.images_extracted()
    assert (first.slots, admission.held) == (1, 4)
    admission.take(2)  # a third request's images now fit beside the first's last slot
    admission.release(first.slots, images=first.images)
    assert admission.held == 5


def test_requests_turned_away_after_admission_do_not_count_as_work_done():
    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission

    def retry_after(turned_away_count: int, served: bool) -> int:
        admission = Admission(limit=2, min_retry_after_s=1, max_retry_after_s=30, clock=lambda: 100.0)
        for _ in range(turned_away_count):
            admission.admit()
            admission.release(1, served=served)
        admission.take(2)
        for _ in range(8):  # 8 clients already told to wait
            with pytest.raises(ApiError):
                admission.take(1)
        with pytest.raises(ApiError) as exc:
            admission.take(1)
        return exc.value.retry_after_s

    # 40 served in the window: 8 a second, the 9th waiting client comes back after 2 s; the same
    # 40 turned away after admission are no work done (0.4 a second assumed: 23 s).
    assert retry_after(40, served=True) == 2
    assert retry_after(40, served=False) == 23


def test_retry_after_spreads_the_turned_away_over_the_rate_of_work_done():
    from facedist.serving.errors import ApiError
    from facedist.serving.ingress import Admission

    now = [100.0]
    admission = Admission(limit=2, min_retry_after_s=1, max_retry_after_s=5, clock=lambda: now[0])
    admission.take(2)

    def refused() -> int:
        with pytest.raises(ApiError) as exc:
            admission.take(1)
        return exc.value.retry_after_s

    # Nothing finished yet: assume the 2 slots' worth finishes in the 5 s window (0.4 a second).
    assert [refused() for _ in range(4)] == [3, 5, 5, 5]  # ceil(n / 0.4), at most 5
    now[0] += 10.0  # every one of them came back: the count starts over
    for _ in range(20):  # 20 finished in the last 5 s: 4 a second
        admission.release(0)
    assert [refused() for _ in range(9)] == [1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_the_extractor_settings_are_one_extract_config():
    """Flat keys (serve/config.yaml, `serve run ... key=value`) fill ServeSettings.extract over the
    server's own defaults; the old key `landmarks` reads as landmark_source."""
    import dataclasses

    from facedist.serving.settings import serving_extract_config

    s = ServeSettings.from_args({"backend": "fit", "landmarks": "dlib", "max_side": "800", "texture": "false"})
    assert s.extract == dataclasses.replace(serving_extract_config(), backend="fit", landmark_source="dlib",
                                            max_side=800, texture=False)
    assert ServeSettings(**dataclasses.asdict(s)).extract == s.extract  # as the deployments get them
    assert ServeSettings.from_args({"extract": {"backend": "deep3d"}}).extract.backend == "deep3d"
    with pytest.raises(ValueError, match="unknown serve settings: nope"):
        ServeSettings.from_args({"extract": {"nope": 1}})
