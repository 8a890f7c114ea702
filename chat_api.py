"""chat_api.py: a client for any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, DashScope, ...),
standard library only (urllib). eval.py's API judge uses it.

- The API key is read from an environment variable, named by the caller; it is never printed or written
  (`repr` names the variable, not the key).
- Retries, with exponential backoff, after a timeout, a connection error, HTTP 429 or 5xx, or a reply that is
  not an OpenAI-shaped JSON object; any other HTTP error (a wrong URL, model or key) stops at once.
- After the last retry it raises APIError with one line that says what to check.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request


class APIError(RuntimeError):
    """The service could not be used: one line naming the URL, the item and what to check."""


class ChatClient:
    """POST {model, messages, temperature, max_tokens} and return the first choice's message content.

    name / flag: what the client is and the flag prefix its settings come from, for the error messages
    (e.g. "judge" / "--judge": "check --judge-url, --judge-model and the key in $OPENAI_API_KEY")."""

    def __init__(self, url: str, model: str, key_env: str, *, timeout: float, retries: int, backoff: float,
                 name: str = "api", flag: str = "--api"):
        self.url = url.rstrip("/")
        self.url += "" if self.url.endswith("/chat/completions") else "/chat/completions"
        self.model, self.key_env, self.timeout, self.retries, self.backoff = model, key_env, timeout, retries, backoff
        self.name, self.flag = name, flag
        self._key = os.environ.get(key_env, "")  # kept out of __repr__, logs and files

    def __repr__(self):
        return f"ChatClient(url={self.url!r}, model={self.model!r}, key from ${self.key_env})"

    def _post(self, messages: list[dict], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]

    def complete(self, messages: list[dict], *, item: str, max_tokens: int = 256) -> str:
        """The reply's text for `messages`; `item` names what it is for in errors (e.g. "record hh-0001")."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post(messages, max_tokens)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:  # our request is wrong: retrying will not help
                    raise APIError(f"{self.name} {self.url} answered HTTP {e.code} for {item}: {e.read()[:300]!r}; "
                                   f"check {self.flag}-url, {self.flag}-model and the key in ${self.key_env}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError, IndexError) as e:
                last = repr(e)  # unreachable, timed out, or not an OpenAI-shaped reply (ValueError: bad JSON)
        raise APIError(f"{self.name} {self.url} failed {self.retries + 1} times on {item} (last: {last}); "
                       f"is the server up? raise {self.flag}-timeout / {self.flag}-retries")
