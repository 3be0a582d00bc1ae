"""The operator console in a real headless chromium, against the whole service in-process.

One service (real HTTP, SQLite, Mosquitto, the simulator rendering in 3 s) and one browser
serve the whole module; each test saves a screenshot under its temporary directory, and, when
STUDIOHOOK_CONSOLE_SCREENSHOTS names a directory, the overview and job pages for the README.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp
import aiomqtt
import orjson
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.config import load_config
from service.console import server as console_server
from service.model import EventStatus, JobState
from tests.support import flaky_handler
from tests.support.browser_fixtures import chromium
from tests.support.service_fixtures import (
    EXAMPLES,
    PATCHES,
    eventually,
    running_service,
    service_config_text,
    shopify_headers,
    unique_prefix,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TOKEN = "console-test-token-7f3a"
CMS_TOKEN = "cms-token-51c2"
RENDER_S = 3.0
SHOPIFY_BODY = (EXAMPLES / "shopify-product-create.json").read_bytes()
README_SHOTS = os.environ.get("STUDIOHOOK_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def console(tmp_path_factory, mqtt_broker):
    """The service with its console, a browser, and a logged-in page context."""
    tmp_path = tmp_path_factory.mktemp("console")
    prefix = unique_prefix()
    text = service_config_text(
        tmp_path,
        broker_port=mqtt_broker.port,
        prefix=prefix,
        admin_token=TOKEN,
        download=True,
        extra_aistudios="stall_seconds = 1.5",
    )
    # A CMS source whose route runs the user's own (for now broken) handler.
    text += f"""
[[sources]]
name = "cms"
kind = "json"
secrets = ["{CMS_TOKEN}"]

[[routes]]
name = "cms-entry"
source = "cms"
template = "promo"
handler = "tests.support.flaky_handler:handle"
{PATCHES}"""
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml", env={})
    flaky_handler.broken = True
    refresh = pytest.MonkeyPatch()
    refresh.setattr(console_server, "LIVE_REFRESH_S", 0.2)
    try:
        async with (
            running_service(cfg, SimulatorKnobs(render_seconds=RENDER_S)) as svc,
            chromium() as browser,
            aiohttp.ClientSession() as http,
        ):
            # The console's CSP forbids eval; Playwright's wait_for_function needs it.
            context = await browser.new_context(
                viewport={"width": 1280, "height": 900}, bypass_csp=True
            )
            page = await context.new_page()
            await page.goto(f"{svc.http_url}/ui/login")
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{svc.http_url}/ui/")
            yield Console(svc, browser, context, page, http, prefix)
            await context.close()
    finally:
        refresh.undo()


class Console:
    def __init__(self, svc, browser, context, page, http, prefix):  # noqa: PLR0917 - one test's parts
        self.svc, self.browser, self.context, self.page = svc, browser, context, page
        self.http, self.prefix = http, prefix
        self.url = f"{svc.http_url}/ui"
        self.deliveries = 0

    async def send_webhook(self):
        self.deliveries += 1
        delivery = f"console-{self.prefix}-{self.deliveries}"
        async with self.http.post(
            f"{self.svc.http_url}/hooks/shop",
            data=SHOPIFY_BODY,
            headers=shopify_headers(SHOPIFY_BODY, delivery),
        ) as response:
            assert response.status == 202
            return (await response.json())["jobs"][0]

    async def wait_state(self, job_id, *states, timeout_s=20.0):
        async def reached():
            job = await self.svc.store.get_job(job_id)
            return job is not None and job.state in states

        await eventually(reached, timeout_s=timeout_s, what=f"{job_id} in {states}")


async def shoot(page, tmp_path, name, *, readme=False):
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if README_SHOTS and readme:
        Path(README_SHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(README_SHOTS) / f"console-{name}.png"))
    return path


async def test_missing_or_wrong_token_is_refused(console, tmp_path):
    stranger = await console.browser.new_context(bypass_csp=True)
    try:
        page = await stranger.new_page()
        await page.goto(f"{console.url}/jobs")
        assert "/ui/login" in page.url
        await page.fill("#token", "not-the-token")
        async with page.expect_response(f"{console.url}/login") as answer:
            await page.click("button[type=submit]")
        assert (await answer.value).status == 401
        assert await page.locator("[role=alert]").inner_text() == "Wrong admin token."
        await shoot(page, tmp_path, "login-refused")
        assert "/ui/login" in page.url
        assert [c for c in await stranger.cookies() if c["name"] == "studiohook_session"] == []
    finally:
        await stranger.close()

    async with console.http.get(f"{console.url}/live/overview") as response:
        assert response.status == 401
    async with console.http.get(
        f"{console.url}/jobs", headers={"Authorization": "Bearer wrong"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"].startswith("/ui/login")
    async with console.http.get(
        f"{console.url}/routes", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        assert response.status == 200
        page_text = await response.text()
        assert "new-product" in page_text
        assert TOKEN not in page_text


async def test_a_new_job_appears_and_its_progress_bar_moves_without_reload(console, tmp_path):
    page = console.page
    await page.goto(f"{console.url}/jobs")
    await page.evaluate(
        """() => {
            window.notReloaded = true;
            window.seen = [];
            const rows = document.getElementById('job-rows');
            new MutationObserver(() => {
                for (const bar of rows.querySelectorAll('tr[data-state] progress')) {
                    window.seen.push([bar.closest('tr').id, bar.closest('tr').dataset.state, bar.value]);
                }
            }).observe(rows, {childList: true, subtree: true});
        }"""
    )
    job_id = await console.send_webhook()
    row = f"#row-{job_id}"
    await page.wait_for_selector(row, timeout=10_000)
    await page.wait_for_function(
        f"document.querySelector('{row}')?.dataset.state === 'notified'", timeout=20_000
    )
    seen = [value for rid, _, value in await page.evaluate("window.seen") if rid == row[1:]]
    moving = sorted({v for v in seen if 0 < v < 100})
    assert len(moving) >= 2, seen
    assert seen == sorted(seen), "the bar only moves forward"
    assert await page.evaluate("window.notReloaded") is True
    assert await page.locator(f"{row} .pct").inner_text() == "100%"
    await shoot(page, tmp_path, "jobs")


async def test_overview_shows_the_stores_figures(console, tmp_path):
    job_id = await console.send_webhook()
    await console.wait_state(job_id, JobState.NOTIFIED)
    page = console.page
    await page.goto(f"{console.url}/")
    store = console.svc.store
    counts = await store.count_jobs_by_state()
    billed = sum((await store.exports_by_route(0)).values())
    assert billed >= 1
    # The overview is read at most once a second for every open page: wait for this reading.
    notified = counts[JobState.NOTIFIED]
    await page.wait_for_function(
        "([billed, notified]) =>"
        " document.getElementById('billed-today').textContent === billed"
        " && document.getElementById('count-notified').textContent === notified",
        arg=[str(billed), str(notified)],
    )
    assert await page.locator("#in-flight").inner_text() == "0"
    assert await page.locator("#ready-store").get_attribute("class") == "ok"
    assert await page.locator("#ready-mqtt").get_attribute("class") == "ok"
    desc = await page.locator("#chart-desc").text_content()
    assert f"{notified} videos ready" in desc

    # The figures follow the store live: a new job shows up in flight without a reload.
    another = await console.send_webhook()
    await page.wait_for_function("document.getElementById('in-flight')?.textContent === '1'")
    await shoot(page, tmp_path, "overview", readme=True)
    await console.wait_state(another, JobState.NOTIFIED)


async def test_job_detail_plays_the_video(console, tmp_path):
    job_id = await console.send_webhook()
    await console.wait_state(job_id, JobState.NOTIFIED)
    page = console.page
    await page.goto(f"{console.url}/jobs/{job_id}")
    video = page.locator("#job-video")
    assert await video.get_attribute("src") == f"/ui/jobs/{job_id}/video"
    await page.wait_for_function(
        "document.getElementById('job-video').readyState >= 1", timeout=10_000
    )
    duration = await page.evaluate("document.getElementById('job-video').duration")
    assert duration > 0
    job = await console.svc.store.get_job(job_id)
    assert await page.locator(".facts .mono").first.inner_text() == job.project_id
    assert "Meet " in await page.locator(".diff").inner_text()
    assert await page.locator(".timeline li").count() == len(
        await console.svc.store.job_history(job_id)
    )
    await shoot(page, tmp_path, "job", readme=True)


async def test_retry_a_failed_job_needs_the_csrf_token_and_succeeds(console, tmp_path):
    console.svc.simulator.knobs.failing_renders_next = 1
    job_id = await console.send_webhook()
    await console.wait_state(job_id, JobState.FAILED)
    page = console.page
    await page.goto(f"{console.url}/jobs/{job_id}")
    assert await page.locator("#job-state").inner_text() == "failed"

    forged = await page.request.post(f"{console.url}/jobs/{job_id}/retry", form={})
    assert forged.status == 403
    wrong = await page.request.post(f"{console.url}/jobs/{job_id}/retry", form={"csrf": "x" * 64})
    assert wrong.status == 403
    assert (await console.svc.store.get_job(job_id)).state is JobState.FAILED

    # Keyboard only: Tab reaches the button, Enter presses it.
    for _ in range(40):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == "Retry this job":
            break
    else:
        pytest.fail("the Retry button cannot be reached with Tab")
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile(r".*done=retried$"))
    assert "Retry accepted" in await page.locator("[role=status]").inner_text()
    await page.wait_for_function(
        "document.getElementById('job-state')?.textContent === 'notified'", timeout=20_000
    )
    await page.wait_for_selector("#job-video")
    await shoot(page, tmp_path, "job-retried")
    notes = [t.note for t in await console.svc.store.job_history(job_id)]
    assert "retried by operator" in notes


async def test_dead_letters_are_listed_with_their_reason(console, mqtt_broker, tmp_path):
    async with aiomqtt.Client("127.0.0.1", mqtt_broker.port) as client:
        await client.publish(f"{console.prefix}/in/lamps", b"{not json", qos=1)
        await client.publish(f"{console.prefix}/in/lamps", orjson.dumps({"title": "no id"}), qos=1)

    async def two_dead():
        counts = await console.svc.store.count_events_by_status()
        return counts[EventStatus.DEAD_LETTERED] >= 2

    await eventually(two_dead, what="two dead letters")
    page = console.page
    await page.goto(f"{console.url}/events?status=dead_lettered")
    rows = page.locator("tbody tr")
    assert await rows.count() == 2
    reasons = await page.locator("tbody tr td:last-child").all_inner_texts()
    assert all(reasons), reasons
    await shoot(page, tmp_path, "events")
    await rows.first.locator("a").click()
    await page.wait_for_selector("text=Reason")
    await shoot(page, tmp_path, "event")
    await page.goto(f"{console.url}/routes")
    assert await page.locator("h2", has_text="new-product").count() == 1
    await shoot(page, tmp_path, "routes")


async def test_a_dead_letter_is_replayed_from_its_page_after_the_fix(console, tmp_path):
    entry = {"title": "Walnut desk", "image_url": "https://img.example/desk.png"}
    async with console.http.post(
        f"{console.svc.http_url}/hooks/cms",
        data=orjson.dumps(entry),
        headers={"Authorization": f"Bearer {CMS_TOKEN}", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 202
        assert (await response.json())["status"] == "dead_lettered"
    [dead] = await console.svc.store.list_events(status=EventStatus.DEAD_LETTERED, source="cms")
    assert "cms handler bug" in dead.reason

    page = console.page
    await page.goto(f"{console.url}/events?status=dead_lettered&source=cms")
    await page.locator("tbody tr a").first.click()
    assert "cms handler bug" in await page.locator(".problem-text").inner_text()
    assert await page.locator("text=This event became no job.").count() == 1

    forged = await page.request.post(f"{console.url}/events/{dead.id}/replay", form={})
    assert forged.status == 403
    assert (await console.svc.store.get_event(dead.id)).status is EventStatus.DEAD_LETTERED

    flaky_handler.broken = False  # the operator fixes the handler
    await page.click("text=Replay this event")
    await page.wait_for_url(re.compile(r".*replayed=1$"))
    assert "1 new job(s)" in await page.locator("[role=status]").inner_text()
    job_link = page.locator("a[href^='/ui/jobs/job_']")
    job_id = (await job_link.inner_text()).strip()
    assert (await console.svc.store.get_event(dead.id)).status is EventStatus.ROUTED
    await shoot(page, tmp_path, "event-replayed")
    await console.wait_state(job_id, JobState.NOTIFIED)

    # Replaying again finds the job that exists: nothing new, nothing paid.
    exports = console.svc.simulator.export_count
    csrf = await page.locator("meta[name=csrf-token]").get_attribute("content")
    again = await page.request.post(
        f"{console.url}/events/{dead.id}/replay", form={"csrf": csrf}, max_redirects=0
    )
    assert again.status == 303
    assert again.headers["location"].endswith("replayed=0")
    assert console.svc.simulator.export_count == exports


async def test_pages_fit_a_phone_screen(console, tmp_path):
    phone = await console.browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, bypass_csp=True
    )
    try:
        page = await phone.new_page()
        await page.goto(f"{console.url}/login")
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{console.url}/")
        for path in ("/", "/jobs", "/events", "/routes"):
            await page.goto(console.url + path)
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} is {overflow}px wider than the screen"
        await shoot(page, tmp_path, "phone-routes")
    finally:
        await phone.close()


async def test_logout_ends_the_session(console, tmp_path):
    context = await console.browser.new_context(bypass_csp=True)
    try:
        page = await context.new_page()
        await page.goto(f"{console.url}/login")
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{console.url}/")
        await page.click("text=Log out")
        await page.wait_for_url(re.compile(r".*/ui/login$"))
        await page.goto(f"{console.url}/jobs")
        assert "/ui/login" in page.url
        await shoot(page, tmp_path, "logged-out")
    finally:
        await context.close()
