"""Tests of chat_api.py against a real HTTP server on 127.0.0.1 (conftest.FakeAPI): the request it sends, retries
after 5xx and timeouts, and one clear error when it gives up or the request is wrong; the key never shows."""

import time
import urllib.parse

import pytest

from chat_api import APIError, ChatClient
from conftest import FakeAPI

MESSAGES = [{"role": "user", "content": "hello"}]


def client(url, retries=2, timeout=5.0):
    return ChatClient(url, "judge-model", "VSR1_TEST_KEY", timeout=timeout, retries=retries, backoff=0.01,
                      name="judge", flag="--judge")


def test_request_and_reply(api_key):
    api = FakeAPI([("reply", "hi there")])
    try:
        c = client(api.url)
        assert c.complete(MESSAGES, item="record a") == "hi there"
        req = api.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {api_key}"
        assert req["body"] == {"model": "judge-model", "messages": MESSAGES, "temperature": 0, "max_tokens": 256}
        assert api_key not in repr(c) and "VSR1_TEST_KEY" in repr(c)
    finally:
        api.close()


def test_retries_after_500(api_key):
    api = FakeAPI([("status", 500), ("status", 503), ("reply", "ok")])
    try:
        assert client(api.url, retries=2).complete(MESSAGES, item="record a") == "ok"
        assert len(api.requests) == 3
    finally:
        api.close()


def test_retries_after_timeout(api_key):
    api = FakeAPI([("sleep", 1.0)])
    try:
        t = time.time()
        assert client(api.url, retries=1, timeout=0.2).complete(MESSAGES, item="record a")
        assert len(api.requests) == 2 and time.time() - t < 1.0
    finally:
        api.close()


def test_gives_up_loudly(api_key):
    api = FakeAPI([("status", 500)] * 3 + [("status", 401)])
    try:
        with pytest.raises(APIError, match="failed 3 times on record a") as e:
            client(api.url, retries=2).complete(MESSAGES, item="record a")
        assert api_key not in str(e.value) and "--judge-timeout" in str(e.value)
        with pytest.raises(APIError, match="HTTP 401") as e:  # a client error is not retried
            client(api.url, retries=2).complete(MESSAGES, item="record a")
        assert len(api.requests) == 4 and api_key not in str(e.value) and "--judge-url" in str(e.value)
    finally:
        api.close()


def test_not_a_chat_completion_is_not_retried(api_key):
    for action in (("raw", b"<html>Welcome to nginx</html>"), ("full", {"object": "list", "data": []})):
        api = FakeAPI([action] + [("reply", "ok")] * 3)
        try:
            with pytest.raises(APIError, match="not an OpenAI chat completion") as e:
                client(api.url, retries=3).complete(MESSAGES, item="record a")
            assert len(api.requests) == 1  # not a passing fault: asked once
            assert "is the server up" not in str(e.value) and "--judge-url" in str(e.value)
        finally:
            api.close()


def test_retry_after_is_honoured(api_key):
    api = FakeAPI([("status", (429, {"Retry-After": "0.6"})), ("status", (503, {"Retry-After": "0.3"})), ("reply", "ok")])
    try:
        t = time.time()
        assert client(api.url, retries=2).complete(MESSAGES, item="record a") == "ok"
        assert time.time() - t >= 0.9  # 0.6 + 0.3, where the backoff alone would wait 0.01 + 0.02
    finally:
        api.close()
    api = FakeAPI([("status", (429, {"Retry-After": "86400"}))])
    try:
        with pytest.raises(APIError, match="asks to retry in 86400 s"):
            client(api.url, retries=2).complete(MESSAGES, item="record a")
        assert len(api.requests) == 1
    finally:
        api.close()


def test_key_is_redacted_from_errors_and_replies(api_key):
    api = FakeAPI([("echo", 401), ("reply", f"your key is {api_key}, thanks")])
    try:
        with pytest.raises(APIError, match="HTTP 401") as e:
            client(api.url).complete(MESSAGES, item="record a")
        assert api_key not in str(e.value) and "***" in str(e.value)  # the body echoed the Authorization header
        text = client(api.url).complete(MESSAGES, item="record a")
        assert api_key not in text and text == "your key is ***, thanks"
    finally:
        api.close()


def test_a_long_key_is_redacted_whole_where_the_message_cuts_the_body(monkeypatch):
    """Bodies are cut to a few hundred characters for the message: redacting after the cut would let the part of a
    long key before the cut through. Also a key echoed JSON-escaped (a '/' as '\\/') or URL-quoted."""
    key = "sk-proj-" + "".join(chr(97 + i % 26) for i in range(150)) + "/xyz+="  # 164 characters, as OpenAI's are
    monkeypatch.setenv("VSR1_TEST_KEY", key)
    pieces = {key[i:i + 8] for i in range(len(key) - 8)}
    bodies = [b"x" * 190 + key.encode(), b"x" * 100 + key.replace("/", "\\/").encode(),
              b"x" * 10 + urllib.parse.quote(key, safe="").encode()]
    api = FakeAPI([("echo", 401)] + [("raw", b) for b in bodies])
    try:
        for _ in range(1 + len(bodies)):
            with pytest.raises(APIError) as e:
                client(api.url, retries=0).complete(MESSAGES, item="record a")
            assert not any(p in str(e.value) for p in pieces) and "***" in str(e.value), str(e.value)
    finally:
        api.close()


def test_connection_refused_is_one_clear_error(api_key):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(APIError, match="failed 2 times .*cannot connect.*is the server up"):
        client(f"http://127.0.0.1:{port}/v1", retries=1).complete(MESSAGES, item="record a")


def test_extra_fields_reach_the_request(api_key):
    reply = {"choices": [{"message": {"content": "3"}, "logprobs": {"content": [{"token": "3", "logprob": -0.1}]}}]}
    api = FakeAPI([("full", reply)])
    try:
        choice = client(api.url).request(MESSAGES, item="record a", max_tokens=1, logprobs=True, top_logprobs=5)
        assert choice["logprobs"]["content"][0]["token"] == "3"
        assert api.requests[0]["body"]["top_logprobs"] == 5 and api.requests[0]["body"]["max_tokens"] == 1
    finally:
        api.close()
