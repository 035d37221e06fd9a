"""One client for OpenAI-compatible chat-completion endpoints (OpenAI, vLLM, llama.cpp server...).

    client = ChatClient.from_env("PSM_JUDGE")          # PSM_JUDGE_BASE_URL / _MODEL / _API_KEY
    reply = client.chat("Rate this ...", max_tokens=1, logprobs=True, top_logprobs=20)
    ChatClient.content(reply), ChatClient.top_logprobs(reply)

Settings come from the arguments, else from `<prefix>_BASE_URL` (or OPENAI_BASE_URL), `<prefix>_MODEL` and
`<prefix>_API_KEY` (or OPENAI_API_KEY; optional for local servers). `transport(url, headers, payload) -> dict`
can be replaced (tests, proxies); nothing is sent before `chat` is called. Standard library only.
"""
from __future__ import annotations

import json
import os
import urllib.request
from typing import Callable, Mapping

Transport = Callable[[str, dict, dict], dict]


class ClientConfigError(ValueError):
    """The endpoint is not configured (no base URL or no model name)."""


def urllib_transport(url: str, headers: dict, payload: dict, timeout: float = 120.0) -> dict:
    """POST `payload` as JSON to `url` and parse the JSON reply."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - user-configured endpoint
        return json.loads(resp.read().decode())


class ChatClient:
    """Single-turn chat completions against one OpenAI-compatible endpoint, temperature 0 unless overridden."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 env_prefix: str = "PSM_JUDGE", transport: Transport | None = None):
        env = os.environ
        self.base_url = (base_url or env.get(f"{env_prefix}_BASE_URL") or env.get("OPENAI_BASE_URL") or "").rstrip("/")
        self.model = model or env.get(f"{env_prefix}_MODEL") or ""
        self.api_key = api_key or env.get(f"{env_prefix}_API_KEY") or env.get("OPENAI_API_KEY")
        missing = [what for what, val in (
            (f"base_url (argument or {env_prefix}_BASE_URL / OPENAI_BASE_URL)", self.base_url),
            (f"model (argument or {env_prefix}_MODEL)", self.model)) if not val]
        if missing:
            raise ClientConfigError("the OpenAI-compatible endpoint is not configured: missing " + " and ".join(missing))
        self.transport = transport or urllib_transport

    @classmethod
    def from_env(cls, env_prefix: str, **kw) -> "ChatClient":
        return cls(env_prefix=env_prefix, **kw)

    def chat(self, prompt: str, **kw) -> dict:
        """One user turn; extra keywords go into the request payload (max_tokens, logprobs, ...)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **kw}
        return self.transport(f"{self.base_url}/chat/completions", headers, payload)

    @staticmethod
    def content(resp: Mapping) -> str:
        """The reply text of a chat completion."""
        try:
            return str(resp["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"endpoint reply has no message content ({err!r}); expected an OpenAI-style chat "
                             "completion") from err

    @staticmethod
    def top_logprobs(resp: Mapping) -> list[tuple[str, float]]:
        """(token, logprob) pairs of the first reply token (a request with logprobs=true, top_logprobs=k)."""
        try:
            top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            return [(t["token"], float(t["logprob"])) for t in top]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"endpoint reply has no top logprobs ({err!r}); expected an OpenAI-style chat "
                             "completion with logprobs=true") from err
