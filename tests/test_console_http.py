"""The console over real HTTP on loopback, without a browser: guard, headers, streams, shutdown."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import aiohttp
import anyio
import pytest
from aiohttp import web

from service.console.auth import SESSION_TTL_S
from service.console.server import Console
from service.store.sqlite import SQLiteStore
from tests.support.service_fixtures import make_config, unique_prefix
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

TOKEN = "http-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def console_at(tmp_path, *, admin_token=TOKEN, clock=time.time):
    cfg = make_config(tmp_path, broker_port=1883, prefix=unique_prefix(), admin_token=admin_token)
    store = SQLiteStore(tmp_path / "console.db")
    await store.open()
    retries = []

    async def store_check():
        await store.ping()

    console = Console(
        store=store,
        cfg=cfg,
        templates={},
        checks={"store": store_check},
        on_retry=lambda: retries.append(time.time()),
        clock=clock,
        live_refresh_s=0.05,
    )
    app = web.Application()
    app.add_subapp("/ui", console.app())
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=30)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            yield f"http://{host}:{port}/ui", http, store, runner, retries
    finally:
        await runner.cleanup()
        await store.close()


async def test_without_an_admin_token_the_console_refuses_to_run(tmp_path):
    async with console_at(tmp_path, admin_token="") as (url, http, *_):
        for path in ("/", "/jobs", "/login"):
            async with http.get(url + path) as response:
                assert response.status == 403
                assert "admin_token" in await response.text()
        async with http.post(url + "/login", data={"token": ""}) as response:
            assert response.status == 403
        async with http.get(url + "/static/console.css") as response:
            assert response.status == 200


async def test_pages_carry_a_strict_policy_and_are_not_cached(tmp_path):
    async with console_at(tmp_path) as (url, http, *_):
        async with http.get(url + "/", headers=BEARER) as response:
            assert response.status == 200
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy
            assert "frame-ancestors 'none'" in policy
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            html = await response.text()
        assert TOKEN not in html
        assert "<script>" not in html
        assert " style=" not in html
        assert "http://" not in html.replace(url, "")
        assert "https://" not in html


async def test_login_needs_the_forms_own_csrf_token_and_never_redirects_away(tmp_path):
    async with console_at(tmp_path) as (url, http, *_):
        async with http.post(url + "/login", data={"token": TOKEN}) as response:
            assert response.status == 403
        async with http.get(url + "/login", params={"next": "//evil.example/x"}) as response:
            html = await response.text()
        csrf = html.split('name="csrf" value="')[1].split('"')[0]
        assert 'name="next" value="/ui/"' in html
        form = {"token": TOKEN, "csrf": csrf, "next": "https://evil.example/"}
        async with http.post(url + "/login", data=form, allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/ui/"
            cookie = response.cookies["studiohook_session"]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Strict"
            assert cookie["path"] == "/ui"


async def test_posts_with_a_bearer_token_still_need_the_csrf_token(tmp_path):
    async with console_at(tmp_path) as (url, http, store, _, retries):
        event = sample_event("k1")
        job = sample_job(event)
        await store.accept_event(event, [job])
        retry = f"{url}/jobs/{job.job_id}/retry"
        async with http.post(retry, headers=BEARER) as response:
            assert response.status == 403
        async with http.get(f"{url}/jobs/{job.job_id}", headers=BEARER) as response:
            assert response.status == 200
            html = await response.text()
        assert "Retry this job" not in html  # received: nothing to retry
        csrf = html.split('name="csrf-token" content="')[1].split('"')[0]
        async with http.post(retry, headers=BEARER, data={"csrf": csrf}) as response:
            assert response.status == 409
            assert "only failed or rejected jobs are retried" in await response.text()
        assert retries == []
        async with http.post(retry, data={"csrf": csrf}) as response:
            assert response.status == 401


async def test_bad_filters_and_unknown_rows_are_clear_errors(tmp_path):
    async with console_at(tmp_path) as (url, http, *_):
        for path, status in (
            ("/jobs?state=exploded", 400),
            ("/jobs?since=forever", 400),
            ("/events?status=lost", 400),
            ("/jobs/job_nope", 404),
            ("/events/999", 404),
            ("/jobs/job_nope/video", 404),
        ):
            async with http.get(url + path, headers=BEARER) as response:
                assert response.status == status, path


async def test_open_live_streams_end_when_the_listener_stops(tmp_path):
    async with (
        console_at(tmp_path) as (url, http, _, runner, _),
        http.get(url + "/live/overview", headers=BEARER) as stream,
    ):
        assert stream.headers["Content-Type"] == "text/event-stream"
        first = await stream.content.readuntil(b"\n\n")
        assert first.startswith(b"event: fragment\ndata: ")
        with anyio.fail_after(5):  # not the 30 s shutdown timeout
            await runner.cleanup()


async def log_in(url, http):
    async with http.get(url + "/login") as response:
        html = await response.text()
    csrf = html.split('name="csrf" value="')[1].split('"')[0]
    form = {"token": TOKEN, "csrf": csrf, "next": "/ui/"}
    async with http.post(url + "/login", data=form, allow_redirects=False) as response:
        assert response.status == 303


async def test_a_live_stream_ends_with_the_session_that_opened_it(tmp_path):
    now = [time.time()]
    async with console_at(tmp_path, clock=lambda: now[0]) as (url, http, *_):
        await log_in(url, http)
        async with http.get(url + "/live/overview") as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            now[0] += SESSION_TTL_S
            with anyio.fail_after(5):
                assert await stream.content.read() is not None  # read to the end
            assert stream.content.at_eof()
        async with http.get(url + "/live/overview") as response:
            assert response.status == 401
