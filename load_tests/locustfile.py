"""Load the gateway like real chat traffic: streamed OpenAI chat requests with ShareGPT prompts.

    locust -f load_tests/locustfile.py --headless --host http://127.0.0.1:8000 -u 16 -r 4 \\
        --load-shape ramp --csv out/run --csv-full-history --html out/run.html

Only HTTP to the gateway, so it runs against ``slmctl up`` or a cluster. Each request is a
streamed ``/v1/chat/completions`` with a ShareGPT first turn (``prompts.jsonl``), a strategy
(``x-slm-strategy``) and a data class (``x-slm-data-class``) drawn from the mixes given.
Each answer is recorded as locust request events, all named by the strategy asked for:

- ``CHAT``: the whole streamed answer (response time = latency to the end of the stream;
  a non-200, an error event in the stream, a cut stream or the timeout is a failure);
- ``TTFT``: time to the first non-empty content delta (also once more under the name
  ``all``, every strategy together, for the capacity plot's per-plateau p95);
- ``ITL``: mean gap between output tokens of that answer, (last - first) / (tokens - 1);
- ``TPS``: that answer's output tokens per second, end to end (the "ms" column is tokens/s).

A headless run checks ``slo.yaml`` at the end and exits 1 when an SLO is missed, and with
``--csv PREFIX --csv-full-history`` draws ``PREFIX_capacity.png`` (``plot.py``).
"""

from __future__ import annotations

import atexit
import json
import logging
import random
import sys
import time
from pathlib import Path

import gevent
import requests
from locust import LoadTestShape, User, constant, events, task
from locust.runners import LocalRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `load_tests` as a package, from any cwd

from load_tests import shapes, slo  # noqa: E402

log = logging.getLogger("slm.load")

HERE = Path(__file__).resolve().parent
STRATEGIES = ("route", "cascade", "race", "default")  # default: no header, the gateway's own choice
DATA_CLASSES = ("public", "internal", "restricted", "default")
CHAT_PATH = "/v1/chat/completions"


def parse_mix(text: str, allowed: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``route=0.7,cascade=0.2,race=0.1`` -> (names, weights); weights need not sum to 1."""
    names, weights = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if name not in allowed:
            raise ValueError(f"unknown mix entry {name!r}; use {', '.join(allowed)}")
        w = float(weight) if sep else 1.0
        if w < 0:
            raise ValueError(f"negative weight for {name!r}")
        if w > 0:
            names.append(name)
            weights.append(w)
    if not names:
        raise ValueError(f"empty mix {text!r}")
    return tuple(names), tuple(weights)


def load_prompts(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("slm-cluster load test")
    g.add_argument("--prompts", default=str(HERE / "prompts.jsonl"), help="JSONL of prompts (load_tests/build_prompts.py)")
    g.add_argument("--model", default="auto", help="model to ask for (default auto: the router decides)")
    g.add_argument("--api-key", default="", env_var="SLM_API_KEY", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--strategy-mix", default="route=0.7,cascade=0.2,race=0.1",
                   help="x-slm-strategy weights; 'default' sends no header")
    g.add_argument("--data-class-mix", default="public=0.8,internal=0.15,restricted=0.05",
                   help="x-slm-data-class weights; 'default' sends no header")
    g.add_argument("--max-tokens", default="128", help="max_tokens of each request, or 'dataset': the prompt's "
                   "original reply length (chars/4, 16..512)")
    g.add_argument("--request-timeout", type=float, default=60.0, help="hard limit on one request, seconds (default 60)")
    g.add_argument("--think-time", type=float, default=0.0, help="pause between a user's requests, seconds (default 0)")
    g.add_argument("--load-shape", default="steady", choices=shapes.SHAPES, env_var="SLM_LOAD_SHAPE",
                   help="steady (plain -u/-r/-t), ramp, spike or soak; -u is the peak (docs/load_testing.md)")
    g.add_argument("--shape-duration", type=float, default=0.0, env_var="SLM_SHAPE_DURATION",
                   help="seconds the shape lasts (default: -t for steady, else ramp 180, spike 90, soak 600)")
    g.add_argument("--ramp-steps", type=int, default=6, help="plateaus of the ramp shape (default 6)")
    g.add_argument("--slo", default=str(slo.DEFAULT_FILE), help="SLO file checked at the end, or 'none'")
    g.add_argument("--plot", default="", help="capacity PNG (default PREFIX_capacity.png with --csv and "
                   "--csv-full-history; 'none' to skip)")
    g.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt, strategy and data-class draws")


class Traffic:
    """What the users share: prompts, mixes and a few run-wide counters."""

    def __init__(self, opts) -> None:
        self.prompts = load_prompts(opts.prompts)
        self.strategies = parse_mix(opts.strategy_mix, STRATEGIES)
        self.data_classes = parse_mix(opts.data_class_mix, DATA_CLASSES)
        self.max_tokens = opts.max_tokens
        if self.max_tokens != "dataset":
            int(self.max_tokens)  # fail at start, not per request
        self.rng = random.Random(opts.prompt_seed)
        self.output_tokens = 0
        self.escalated = 0
        self.started = time.monotonic()

    def draw(self) -> tuple[dict, str, str]:
        prompt = self.rng.choice(self.prompts)
        strategy = self.rng.choices(*self.strategies)[0]
        data_class = self.rng.choices(*self.data_classes)[0]
        return prompt, strategy, data_class

    def max_tokens_for(self, prompt: dict) -> int:
        if self.max_tokens == "dataset":
            return max(16, min(512, round(prompt.get("reply_chars", 512) / 4)))
        return int(self.max_tokens)


TRAFFIC: Traffic | None = None


@events.init.add_listener
def _init(environment, **_) -> None:
    global TRAFFIC
    opts = environment.parsed_options
    if opts is None:
        return
    TRAFFIC = Traffic(opts)
    if not isinstance(environment.runner, WorkerRunner):
        _register_plot(opts)


def _register_plot(opts) -> None:
    if opts.plot == "none" or not opts.csv_prefix:
        return
    if not opts.stats_history_enabled:
        log.warning("no capacity plot: it needs --csv-full-history (per-entry rows in _stats_history.csv)")
        return
    out = opts.plot or f"{opts.csv_prefix}_capacity.png"
    history = f"{opts.csv_prefix}_stats_history.csv"

    def draw() -> None:  # at exit: locust closes its CSV files after the quitting event
        from load_tests import plot

        try:
            plot.plot(history, out, slo_ms=_slo_ttft(opts))
            print(f"capacity plot: {out}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a missing plot must not hide the run's result
            print(f"capacity plot failed: {exc!r}", file=sys.stderr)

    atexit.register(draw)


def _slo_ttft(opts) -> float | None:
    return None if opts.slo == "none" else slo.load(opts.slo).p95_ttft_ms


@events.quitting.add_listener
def _check_slo(environment, **_) -> None:
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, WorkerRunner):
        return
    fig = slo.figures(environment.stats)
    if TRAFFIC is not None and isinstance(environment.runner, LocalRunner):  # a master's users are on its workers
        took = max(time.monotonic() - TRAFFIC.started, 1e-9)
        print(f"output tokens: {TRAFFIC.output_tokens} ({TRAFFIC.output_tokens / took:.1f}/s over the run); "
              f"escalated answers: {TRAFFIC.escalated}", file=sys.stderr)
    if opts.slo == "none":
        return
    target = slo.load(opts.slo)
    print(slo.report(target, fig), file=sys.stderr)
    missed = slo.misses(target, fig)
    for line in missed:
        print(f"SLO missed: {line}", file=sys.stderr)
    if missed:
        environment.process_exit_code = 1


class SLMShape(LoadTestShape):
    """The shape chosen by ``--load-shape`` / ``SLM_LOAD_SHAPE``; every one ends (shapes.py)."""

    use_common_options = True  # -u is the peak, -r the spawn rate, -t a hard stop

    def __init__(self) -> None:
        super().__init__()
        self._schedule: shapes.Schedule | None = None

    def tick(self):
        if self._schedule is None:
            opts = self.runner.environment.parsed_options
            duration = opts.shape_duration or (opts.run_time if opts.load_shape == "steady" else None)
            self._schedule = shapes.schedule(opts.load_shape, int(opts.num_users or 1), float(opts.spawn_rate or 1),
                                             duration, opts.ramp_steps)
        return self._schedule.at(self.get_run_time())


def _fire(environment, request_type: str, name: str, value: float, length: int = 0, exc: Exception | None = None) -> None:
    environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                    response_length=length, exception=exc, context={})


class StreamError(Exception):
    pass


class ChatUser(User):
    """One chat client: a streamed request, then ``--think-time``, again."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()
        opts = self.environment.parsed_options
        self.timeout = float(opts.request_timeout)
        self.think = float(opts.think_time)
        self.headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if opts.api_key:
            self.headers["authorization"] = f"Bearer {opts.api_key}"
        self.model = opts.model

    def on_stop(self) -> None:
        self.session.close()

    @task
    def chat(self) -> None:
        assert TRAFFIC is not None
        prompt, strategy, data_class = TRAFFIC.draw()
        headers = dict(self.headers)
        if strategy != "default":
            headers["x-slm-strategy"] = strategy
        if data_class != "default":
            headers["x-slm-data-class"] = data_class
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt["prompt"]}], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": TRAFFIC.max_tokens_for(prompt)}
        self._one(strategy, headers, body)
        if self.think:
            gevent.sleep(self.think)

    def _one(self, name: str, headers: dict, body: dict) -> None:
        start = time.perf_counter()
        stamps: list[float] = []
        usage_tokens, size, escalated = None, 0, False
        error: Exception | None = None
        try:
            # gevent.Timeout bounds the whole exchange, connect to last byte, whatever the server does
            with gevent.Timeout(self.timeout, StreamError(f"timed out after {self.timeout:.0f} s")):
                resp = self.session.post(f"{self.host}{CHAT_PATH}", json=body, headers=headers, stream=True,
                                         timeout=(5, self.timeout))
                try:
                    if resp.status_code != 200:
                        raise StreamError(f"HTTP {resp.status_code}: {_error_code(resp.text)}")
                    escalated = resp.headers.get("x-slm-escalated") == "true"
                    done = False
                    for line in resp.iter_lines():
                        size += len(line) + 1
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            raise StreamError(f"stream error: {event['error'].get('code') or event['error'].get('type')}")
                        if event.get("usage"):
                            usage_tokens = event["usage"].get("completion_tokens")
                        for choice in event.get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                stamps.append(time.perf_counter())
                    if not done:
                        raise StreamError("stream ended without [DONE]")
                finally:
                    resp.close()
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request event
            error = exc if isinstance(exc, StreamError) else StreamError(f"{type(exc).__name__}: {exc}"[:200])
        end = time.perf_counter()
        env = self.environment
        _fire(env, slo.CHAT, name, (end - start) * 1000, size, error)
        if error is not None and size == 0:
            gevent.sleep(0.1)  # no answer at all (refused, reset): do not spin on a server that is down
        if error is not None or not stamps:
            return
        tokens = usage_tokens or len(stamps)
        ttft = (stamps[0] - start) * 1000
        _fire(env, slo.TTFT, name, ttft)
        _fire(env, slo.TTFT, slo.ALL, ttft)  # percentiles do not add up across entries: the plot reads this one
        if tokens > 1 and stamps[-1] > stamps[0]:
            _fire(env, slo.ITL, name, (stamps[-1] - stamps[0]) * 1000 / (tokens - 1))
        _fire(env, slo.TPS, name, tokens / (end - start))
        TRAFFIC.output_tokens += tokens
        TRAFFIC.escalated += escalated


def _error_code(text: str) -> str:
    try:
        err = json.loads(text).get("error") or {}
        return str(err.get("code") or err.get("type") or "error")
    except (ValueError, AttributeError):
        return text[:80]
