from __future__ import annotations

import threading
import time

import httpx
import pytest

from flowgen.delivery import DeliveryPool, make_client, post_result
from flowgen.net.redact import redact_webhook_url


def test_results_in_submission_order_and_bounded():
    active = 0
    peak = 0
    lock = threading.Lock()

    def job(i):
        def run(client):
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.01 * (6 - i))  # later jobs finish first
            with lock:
                active -= 1
            return i

        return run

    with DeliveryPool(max_workers=2) as pool:
        assert pool.run([job(i) for i in range(6)]) == list(range(6))
    assert peak == 2


def test_webhooks_in_parallel(httpserver, policy):
    for i in range(8):
        httpserver.expect_request(f"/hook/{i}", method="POST").respond_with_data("ok")
    urls = [httpserver.url_for(f"/hook/{i}") for i in range(8)]
    with DeliveryPool() as pool:
        deliveries = pool.run(
            [lambda c, u=u, i=i: post_result(c, u, {"i": i}, secret=b"k", policy=policy) for i, u in enumerate(urls)]
        )
    assert [d.ok for d in deliveries] == [True] * 8
    assert [d.url for d in deliveries] == [redact_webhook_url(u) for u in urls]  # a webhook's path may be its secret
    assert sorted(r.path for r, _ in httpserver.log) == sorted(f"/hook/{i}" for i in range(8))


def test_all_jobs_finish_before_an_error_is_raised():
    finished = []

    def ok(i):
        def run(client):
            time.sleep(0.02)
            finished.append(i)
            return i

        return run

    def boom(client):
        raise RuntimeError("bad job")

    with DeliveryPool(max_workers=2) as pool:
        with pytest.raises(RuntimeError, match="bad job"):
            pool.run([boom, ok(1), ok(2), ok(3)])
    assert sorted(finished) == [1, 2, 3]


def test_pool_client_ownership():
    external = httpx.Client()
    with DeliveryPool(client=external) as pool:
        assert pool.client is external
    assert not external.is_closed  # not ours to close
    external.close()

    with DeliveryPool() as pool:
        own = pool.client
    assert own.is_closed


def test_make_client_never_follows_redirects():
    with make_client() as client:
        assert client.follow_redirects is False


def test_pool_rejects_zero_workers():
    with pytest.raises(ValueError):
        DeliveryPool(max_workers=0)
