"""The paid request of each flow, as data: what `preview` prints and what the client sends.

One job costs one of four POSTs (a v3 export, a legacy export, a template/modify, and, for
an existing project, a project/modify). `preview` shows the exact method, URL and body
without sending, so a user sees `isExport: true` and the `updates` keys before paying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.aistudios.templates_v3 import modify_body

V3_EXPORT_PATH = "/api/odin/v3/editor/project"
LEGACY_EXPORT_PATH = "/api/odin/editor/project"
TEMPLATE_MODIFY_PATH = "/api/odin/v3/template/modify"
TEMPLATE_MODIFY_API = "v3-template"
"""A job's `api` when its paid call is template/modify."""


@dataclass(frozen=True, slots=True)
class PaidRequest:
    """One billed HTTP request: method, absolute URL and JSON body."""

    method: str
    url: str
    body: dict[str, Any]


def paid_request(
    api: str,
    body: dict[str, Any],
    *,
    name: str,
    base_url: str,
    legacy_base_url: str,
    webhook_url: str | None = None,
) -> PaidRequest:
    """The request a job of `api` with stored `body` and export `name` sends."""
    if api == "legacy":
        return PaidRequest(
            "POST", f"{legacy_base_url}{LEGACY_EXPORT_PATH}", {"scenes": body["scenes"]}
        )
    if api == TEMPLATE_MODIFY_API:
        payload = modify_body(
            ("templateId", body["templateId"]), body["updates"], name=name, webhook_url=webhook_url
        )
        return PaidRequest("POST", f"{base_url}{TEMPLATE_MODIFY_PATH}", payload)
    payload = {**body, "name": name}
    if webhook_url:
        payload["webhookUrl"] = webhook_url
    return PaidRequest("POST", f"{base_url}{V3_EXPORT_PATH}", payload)
