"""The configuration documents browser SDKs fetch before they send, naming this service.

- analytics.js: ``GET <cdnURL>/v1/projects/<writeKey>/settings``: only the
  "Segment.io" destination, its API host this service, metrics off.
- RudderStack's JS SDK: ``GET <configUrl>/sourceConfig/``: an enabled source with
  no destinations (device-mode integrations would load code from a CDN).
- posthog-js: ``GET /array/<token>/config`` (or ``config.js``), and ``POST /flags/``
  (older versions ``/decide/``): no feature flags, no session recording, no
  surveys; the compressions this service takes.

Each checks the write key as the ingestion routes do (an unknown key is a 401 the
SDK logs), so a page with a wrong key fails at once, not at its first event.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core.settings import Settings
from service.cors import Handler, add_preflight, cors_headers
from service.responses import json_response
from service.sdks import API_KEY_HELP, WRITE_KEY_HELP, account_of, basic_user

POSTHOG_CONFIG: dict[str, Any] = {
    "supportedCompression": ["gzip-js", "base64"],
    "hasFeatureFlags": False,
    "sessionRecording": False,
    "surveys": False,
    "productTours": False,
    "heatmaps": False,
    "captureDeadClicks": False,
    "capturePerformance": False,
    "autocaptureExceptions": False,
    "autocapture_opt_out": False,
    "elementsChainAsString": True,  # one string, not an element tree: small events
    "conversations": False,
    "siteApps": [],
    "toolbarParams": {},
    "isAuthenticated": False,
    "defaultIdentifiedOnly": True,
    "analytics": {"endpoint": "/e/"},
}
POSTHOG_FLAGS: dict[str, Any] = {
    **POSTHOG_CONFIG,
    "flags": {},
    "featureFlags": {},
    "featureFlagPayloads": {},
    "errorsWhileComputingFlags": False,
    "quotaLimited": [],
    "config": {"enable_collect_everything": True},
}


def _checked(request: Request, write_key: object, missing: str) -> str:
    """The account a write key stands for (401/403 as on the ingestion routes)."""
    settings: Settings = request.app.ctx.settings
    _key, account = account_of(request, settings, write_key, missing)
    return account


def _api_host(request: Request) -> str:
    """This service as the page reached it: host and port, no scheme."""
    return request.host or f"{request.server_name}:{request.server_port}"


async def segment_settings(request: Request, write_key: str) -> HTTPResponse:
    _checked(request, write_key, WRITE_KEY_HELP)
    body = {
        "integrations": {"Segment.io": {
            "apiKey": write_key, "apiHost": f"{_api_host(request)}/v1",
            "protocol": request.scheme, "unbundledIntegrations": [],
            "addBundledMetadata": True, "maybeBundledConfigIds": {},
        }},
        "metrics": {"sampleRate": 0},
        "plan": {"track": {"__default": {"enabled": True}}},
        "enabledMiddleware": {}, "middlewareSettings": {}, "remotePlugins": [],
        "edgeFunction": {}, "analyticsNextEnabled": True,
    }  # fmt: skip
    return json_response(body, 200, cors_headers(request))


async def rudderstack_source_config(request: Request) -> HTTPResponse:
    write_key = basic_user(request) or request.args.get("writeKey")
    account = _checked(request, write_key, WRITE_KEY_HELP)
    body = {
        "isHosted": False,
        "source": {
            "id": f"events-service:{account}", "name": account, "writeKey": write_key,
            "workspaceId": "events-service", "enabled": True, "config": {},
            "destinations": [],
        },
    }  # fmt: skip
    return json_response(body, 200, cors_headers(request))


async def posthog_config(request: Request, token: str) -> HTTPResponse:
    _checked(request, token, API_KEY_HELP)
    return json_response(POSTHOG_CONFIG, 200, cors_headers(request))


async def posthog_config_js(request: Request, token: str) -> HTTPResponse:
    _checked(request, token, API_KEY_HELP)
    config = msgspec.json.encode({"config": POSTHOG_CONFIG, "siteApps": []}).decode()
    name = msgspec.json.encode(token).decode()
    script = ("window._POSTHOG_REMOTE_CONFIG = window._POSTHOG_REMOTE_CONFIG || {};\n"
              f"window._POSTHOG_REMOTE_CONFIG[{name}] = {config};\n")  # fmt: skip
    return HTTPResponse(script, 200, cors_headers(request), "application/javascript")


async def posthog_flags(request: Request) -> HTTPResponse:
    """No flags, whoever asks: the answer holds nothing an account owns."""
    return json_response(POSTHOG_FLAGS, 200, cors_headers(request))


def add_routes(app: Sanic[Any, Any]) -> None:
    doc = openapi.definition
    routes: list[tuple[str, Handler, list[str], str]] = [
        ("/v1/projects/<write_key:str>/settings", segment_settings, ["GET"],
         "analytics.js settings: this service as the Segment.io destination"),
        ("/sourceConfig/", rudderstack_source_config, ["GET"],
         "RudderStack JS SDK source config: enabled, no destinations"),
        ("/array/<token:str>/config", posthog_config, ["GET"],
         "posthog-js remote config: no flags, no recording"),
        ("/array/<token:str>/config.js", posthog_config_js, ["GET"],
         "posthog-js remote config as a script"),
        ("/flags/", posthog_flags, ["GET", "POST"], "posthog-js feature flags: none"),
        ("/decide/", posthog_flags, ["GET", "POST"], "posthog-js (older) decide: no flags"),
    ]  # fmt: skip
    for i, (path, handler, methods, summary) in enumerate(routes):
        app.add_route(doc(summary=summary)(handler), path, methods=methods,
                      name=f"sdk_config_{i}", ctx_cors="write")  # fmt: skip
        add_preflight(app, path, "write", f"sdk_config_{i}_preflight")
