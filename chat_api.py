"""chat_api.py: a client for any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, DashScope, ...),
standard library only (urllib). eval.py's API judge uses it.

- The API key is read from an environment variable, named by the caller. It is never printed or written: every
  text the client hands back or puts in an error (a reply, an error body that echoes the request) has the key
  replaced by "***", and `repr` names the variable, not the key.
- Retries, with exponential backoff, after a timeout, a connection error, HTTP 429 or 5xx (waiting as long as the
  server's Retry-After asks, when it sends one). A reply that is not an OpenAI chat completion (not JSON, or no
  `choices`) is not a passing fault: it stops at once, as does any other HTTP error (a wrong URL, model or key).
- Every failure raises APIError, whose one line says what happened and what to check.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

MAX_RETRY_AFTER = 600.0  # seconds: the longest Retry-After honoured; a server asking for more is told no


class APIError(RuntimeError):
    """The service could not be used: one line naming the URL, the item and what to check."""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ChatClient:
    """POST {model, messages, temperature, max_tokens, ...} and return the first choice.

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

    def redact(self, text: str) -> str:
        """`text` with the API key replaced by ***, also where a server echoed it JSON-escaped or URL-quoted.
        Redact whole texts, then cut them: a cut first could leave part of the key, which no longer matches."""
        if not self._key:
            return text
        escaped = json.dumps(self._key)[1:-1]
        for form in {self._key, escaped, escaped.replace("/", "\\/"), urllib.parse.quote(self._key, safe="")}:
            text = text.replace(form, "***")
        return text

    def _post(self, body: dict) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def _choice(self, raw: bytes, item: str) -> dict:
        """The first choice of a chat-completion reply, or APIError (not retried: the server works, but is not one)."""
        try:
            choice = json.loads(raw)["choices"][0]
            choice["message"]["content"] = self.redact(choice["message"]["content"] or "")
            return choice
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            shown = self.redact(raw.decode("utf-8", "replace"))[:200]
            raise APIError(f"{self.name} {self.url} sent a reply for {item} that is not an OpenAI chat completion "
                           f"(not JSON, or without choices[0].message.content): {shown!r}; check that {self.flag}-url "
                           "is an OpenAI-compatible endpoint (it usually ends in /v1)") from None

    def request(self, messages: list[dict], *, item: str, max_tokens: int = 256, **extra) -> dict:
        """The first choice ({"message": {"content": ...}, "logprobs": ...}) of the reply to `messages`, with the
        text redacted. `extra` goes into the request body as it is (e.g. logprobs=True, top_logprobs=5).
        `item` names what the request is for in errors (e.g. "record hh-0001")."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **extra}
        last, wait = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(wait, self.backoff * 2 ** (attempt - 1)))
            wait = 0.0
            try:
                return self._choice(self._post(body), item)
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read().decode("utf-8", "replace"))[:300]
                if e.code != 429 and e.code < 500:  # our request is wrong: retrying will not help
                    raise APIError(f"{self.name} {self.url} answered HTTP {e.code} for {item}: {detail!r}; check "
                                   f"{self.flag}-url, {self.flag}-model and the key in ${self.key_env}") from None
                asked = retry_after(e.headers.get("Retry-After")) if e.headers else None
                if asked is not None and asked > MAX_RETRY_AFTER:
                    raise APIError(f"{self.name} {self.url} answered HTTP {e.code} for {item} and asks to retry in "
                                   f"{asked:.0f} s (more than {MAX_RETRY_AFTER:.0f} s); try again later") from None
                wait, last = asked or 0.0, f"HTTP {e.code}"
            except (TimeoutError, socket.timeout):
                last = f"no answer within {self.timeout:g} s"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = (f"no answer within {self.timeout:g} s" if isinstance(reason, TimeoutError)
                        else f"cannot connect: {self.redact(str(reason))}")
        raise APIError(f"{self.name} {self.url} failed {self.retries + 1} times on {item} (last: {last}); is the "
                       f"server up? raise {self.flag}-timeout / {self.flag}-retries")

    def complete(self, messages: list[dict], *, item: str, max_tokens: int = 256) -> str:
        """The reply's text for `messages` (redacted); see `request`."""
        return self.request(messages, item=item, max_tokens=max_tokens)["message"]["content"]
