"""Tests of chat_api.py against a real HTTP server on 127.0.0.1 (conftest.FakeAPI): the request it sends, retries
after 5xx and timeouts, and one clear error when it gives up or the request is wrong; the key never shows."""

import time

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
