"""tunelab serve's API key: a dependency of every route in ``server.router``, and checked again in front
of routing so that requests no route answers (unknown paths, /openapi.json, bodies that are not JSON)
get 401 too."""

from __future__ import annotations

import pytest

from tunelab.serve.engine import Engine

from conftest import tiny_llama, tiny_tokenizer_obj

pytest.importorskip("fastapi")
KEY = "k-123"


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(), tiny_tokenizer_obj(), max_queue=1)


def test_every_request_without_the_key_gets_401(engine):
    from fastapi.testclient import TestClient

    from tunelab.serve.server import create_app

    http = TestClient(create_app(engine, "tiny", api_key=KEY))
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/nope", None), ("GET", "/openapi.json", None),
                               ("POST", "/v1/models", None), ("POST", "/v1/completions", "{not json")]:
        r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, r.text)
    ok = {"Authorization": f"Bearer {KEY}"}
    assert http.get("/nope", headers=ok).status_code == 404 and http.get("/openapi.json", headers=ok).status_code == 200


def test_the_router_carries_its_key_check(engine):
    """Mounted without create_app's check in front of routing, the routes still need the key."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tunelab.serve import server

    app = FastAPI()
    app.state.served = server.Served(engine, "tiny", KEY, 64, 16, 0)
    app.add_exception_handler(server.ApiError, server._api_error)
    app.include_router(server.router)
    http = TestClient(app)
    r = http.get("/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["data"][0]["id"] == "tiny"
