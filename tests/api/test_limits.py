"""The app API's request limits: the token buckets driven by a fake clock, and 429 + Retry-After
through the API (httpx's ASGI transport, the in-memory service of test_app_api)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sipis.api import create_app
from sipis.api.limits import Buckets, RateLimits, TokenBucket
from sipis.clock import FakeClock
from sipis.config import ApiConfig, SipConfig
from tests.api.test_app_api import ENROL_TOKEN, FakeService, assert_error, bearer, enrol_body

# ---------------------------------------------------------------------------------------- buckets


def test_a_bucket_grants_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, tokens=3.0, at=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token every half second
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # never above the burst


def test_buckets_are_per_key_and_bounded() -> None:
    buckets = Buckets(rate=1.0, burst=1.0, max_keys=3)
    assert buckets.take("a", 0.0) == 0.0 and buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0, "another key has a bucket of its own"
    buckets.take("c", 0.0)
    buckets.take("a", 0.0)  # "a" is used again: "b" is now the least recently used
    buckets.take("d", 0.0)
    assert len(buckets) == 3
    assert buckets.take("a", 0.0) > 0, "a recently used bucket was forgotten"


def test_rate_zero_is_no_limit() -> None:
    buckets = Buckets(rate=0.0, burst=1.0)
    assert all(buckets.take("a", 0.0) == 0.0 for _ in range(1000)) and len(buckets) == 0


def test_a_request_refused_for_its_source_costs_its_token_nothing() -> None:
    limits = RateLimits(ApiConfig(rate_per_source=1.0, burst_per_source=1.0, rate_per_token=1.0, burst_per_token=1.0))
    assert limits.check("10.0.0.1", "tok", 0.0) == 0.0
    assert limits.check("10.0.0.1", "tok", 0.0) > 0  # the source is over
    assert limits.check("10.0.0.2", "tok", 0.0) > 0  # the token is over, from anywhere
    assert limits.check("10.0.0.3", "other", 0.0) == 0.0
    assert limits.refused == 2
    assert limits.check("10.0.0.2", "tok", 1.0) == 0.0


def test_the_defaults_let_one_address_stay_below_the_register_rate() -> None:
    """Every enrolment may cost a REGISTER and its challenged retry: 2 transactions."""
    api, sip = ApiConfig(), SipConfig()
    assert 2 * api.rate_per_source <= sip.register_rate
    assert api.rate_per_token < api.rate_per_source


# ---------------------------------------------------------------------------------------- the API


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service() -> FakeService:
    return FakeService()


def limited_app(service: FakeService, clock: FakeClock, **settings: Any) -> FastAPI:
    return create_app(service, limits=RateLimits(ApiConfig(**settings), clock))


def client_from(app: FastAPI, source: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(source, 40000)),
                             base_url="http://sipis.test")


async def test_one_address_over_its_limit_gets_429_with_retry_after(service: FakeService, clock: FakeClock) -> None:
    app = limited_app(service, clock, rate_per_source=2.0, burst_per_source=5.0)
    async with client_from(app, "192.0.2.1") as http, client_from(app, "192.0.2.2") as other:
        answers = [(await http.post("/v1/instances", json=enrol_body(), headers=bearer(ENROL_TOKEN))).status_code
                   for _ in range(5)]
        assert answers == [201] * 5
        refused = await http.post("/v1/instances", json=enrol_body(), headers=bearer(ENROL_TOKEN))
        assert_error(refused, 429, "too_many_requests")
        assert refused.headers["Retry-After"] == "1"
        assert len(service.instances) == 5, "a refused enrolment was acted on"
        assert (await http.get("/v1/health")).status_code == 429  # the limit is per address, every route
        assert (await other.get("/v1/health")).status_code == 200, "another address is limited too"
        clock.advance(0.5)
        assert (await http.get("/v1/health")).status_code == 200


async def test_one_instance_token_over_its_limit_gets_429_from_any_address(
        service: FakeService, clock: FakeClock) -> None:
    app = limited_app(service, clock, rate_per_token=0.1, burst_per_token=3.0)
    async with client_from(app, "192.0.2.1") as one, client_from(app, "192.0.2.2") as two, \
            client_from(app, "192.0.2.3") as three:
        enrolled = await one.post("/v1/instances", json=enrol_body(), headers=bearer(ENROL_TOKEN))
        selector, token = enrolled.json()["selector"], enrolled.json()["token"]
        for _ in range(3):
            answer = await one.put(f"/v1/instances/{selector}/state", json={"state": "inactive"},
                                   headers=bearer(token))
            assert answer.status_code == 200
        refused = await one.get(f"/v1/instances/{selector}", headers=bearer(token))
        assert_error(refused, 429, "too_many_requests")
        assert refused.headers["Retry-After"] == "10"
        assert (await two.get(f"/v1/instances/{selector}", headers=bearer(token))).status_code == 429
        assert (await three.post("/v1/instances", json=enrol_body(), headers=bearer(ENROL_TOKEN))).status_code == 201
        clock.advance(10.0)
        assert (await two.get(f"/v1/instances/{selector}", headers=bearer(token))).status_code == 200


async def test_the_openapi_document_names_429(service: FakeService) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),
                                 base_url="http://sipis.test") as http:
        schema = (await http.get("/openapi.json")).json()
    for path in schema["paths"].values():
        for operation in path.values():
            assert "Retry-After" in operation["responses"]["429"]["headers"]
