"""Local video copies: allow-listed hosts only, size-capped, atomic, hashed while streaming."""

import hashlib
import re

import aiohttp
import pytest
from aiohttp import web

from service.config import AIStudiosConfig
from service.notify.download import (
    DownloadError,
    allowed_download_hosts,
    fetch_video,
    host_allowed,
)
from tests.support.loopback import serve_app

pytestmark = pytest.mark.anyio

VIDEO = bytes(range(256)) * 4096 * 3  # 3 MiB, several chunks


@pytest.fixture
async def video_server():
    async def video(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        await response.prepare(request)
        for start in range(0, len(VIDEO), 256 * 1024):
            await response.write(VIDEO[start : start + 256 * 1024])
        await response.write_eof()
        return response

    async def sized(_: web.Request) -> web.Response:
        return web.Response(body=VIDEO)

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/video.mp4", video)
    app.router.add_get("/sized.mp4", sized)
    app.router.add_get("/hop", hop)
    app.router.add_get("/missing.mp4", missing)
    async with serve_app(app) as url:
        yield url


async def fetch(url, dest, *, allowed=("127.0.0.1",), max_bytes=10 * 1024 * 1024):
    async with aiohttp.ClientSession() as session:
        return await fetch_video(
            session, url, dest, "job_abc", allowed_hosts=allowed, max_bytes=max_bytes
        )


async def test_fetches_atomically_with_the_right_sha256(video_server, tmp_path):
    dest = tmp_path / "videos"
    path, sha = await fetch(f"{video_server}/video.mp4", dest)
    assert path == dest / "job_abc.mp4"
    assert path.read_bytes() == VIDEO
    assert sha == hashlib.sha256(VIDEO).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == ["job_abc.mp4"]


async def test_refuses_hosts_outside_the_allow_list(video_server, tmp_path):
    with pytest.raises(
        DownloadError, match=re.escape("refusing to download from '127.0.0.1'")
    ) as refused:
        await fetch(f"{video_server}/video.mp4", tmp_path, allowed=("cdn.example.com",))
    assert refused.value.permanent
    assert list(tmp_path.iterdir()) == []


async def test_redirects_are_checked_at_every_hop(video_server, tmp_path):
    evil = "http://localhost:1/video.mp4"
    with pytest.raises(DownloadError, match="'localhost'"):
        await fetch(f"{video_server}/hop?to={evil}", tmp_path)
    path, _ = await fetch(f"{video_server}/hop?to=/video.mp4", tmp_path)
    assert path.read_bytes() == VIDEO


async def test_size_cap_aborts_a_stream_and_leaves_no_partial_file(video_server, tmp_path):
    with pytest.raises(DownloadError, match="byte cap") as capped:
        await fetch(f"{video_server}/video.mp4", tmp_path, max_bytes=1024 * 1024)
    assert capped.value.permanent
    assert list(tmp_path.iterdir()) == []


async def test_size_cap_refuses_a_declared_length_up_front(video_server, tmp_path):
    with pytest.raises(DownloadError, match=f"is {len(VIDEO)} bytes"):
        await fetch(f"{video_server}/sized.mp4", tmp_path, max_bytes=1024)
    assert list(tmp_path.iterdir()) == []


async def test_a_failed_fetch_keeps_the_previous_copy(video_server, tmp_path):
    await fetch(f"{video_server}/video.mp4", tmp_path)
    with pytest.raises(DownloadError, match="HTTP 404") as missing:
        await fetch(f"{video_server}/missing.mp4", tmp_path)
    assert missing.value.permanent
    assert (tmp_path / "job_abc.mp4").read_bytes() == VIDEO
    assert [p.name for p in tmp_path.iterdir()] == ["job_abc.mp4"]


async def test_unsafe_job_id_is_refused(tmp_path):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadError, match="safe file name"):
            await fetch_video(
                session, "http://127.0.0.1/x", tmp_path, "../etc", allowed_hosts=["127.0.0.1"]
            )


def test_allow_list_comes_from_the_api_hosts_and_configured_hosts():
    cfg = AIStudiosConfig(download_hosts=("*.cloudfront.net", "Media.Example.com"))
    hosts = allowed_download_hosts(cfg)
    assert hosts == {"app.aistudios.com", "aistudios.com", "*.cloudfront.net", "media.example.com"}
    assert host_allowed("https://d1.cloudfront.net/v.mp4", hosts)
    assert host_allowed("https://MEDIA.example.com/v.mp4", hosts)
    assert not host_allowed("https://cloudfront.net.evil.com/v.mp4", hosts)
    assert not host_allowed("https://evilaistudios.com/v.mp4", hosts)
    assert not host_allowed("ftp://aistudios.com/v.mp4", hosts)
    assert not host_allowed("https://app.aistudios.com.evil.com/v.mp4", hosts)
