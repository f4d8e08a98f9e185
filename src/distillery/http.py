"""JSON over HTTP to the servers a run talks to: a served teacher, a student's sampling server, an
OpenAI-compatible generation backend."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ServerError(RuntimeError):
    """A server could not be reached or answered something unusable; the message names the URL."""


def post_json(url: str, body: dict, *, api_key: str | None = None, timeout: float = 120.0,
              error: type[Exception] = ServerError, hint: str = "") -> Any:
    """POST ``body`` as JSON and return the decoded answer; every failure is one ``error`` naming the URL."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise error(f"{url}: HTTP {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise error(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None
    try:
        return json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError as e:
        raise error(f"{url}: the answer is not JSON ({e})") from None
