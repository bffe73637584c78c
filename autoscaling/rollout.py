"""The canary rollout of one model's new version: a pure state machine.

Flagger's and Argo Rollouts' analysis semantics: the candidate's weight walks through
``steps``; at the end of each step's ``interval_s`` an analysis compares the candidate
with the stable version over that interval. A pass moves to the next step (passing the
last one promotes the candidate); a failed check counts, and ``failure_limit`` failures in
a row roll the candidate back to 0% and mark the rollout ``failed``. Too few candidate
requests is no judgement (``wait``): the step runs another interval. Operators may pause,
resume, promote or abort (``rolled_back``) at any time while it runs.

No I/O and no clock: every transition takes ``now``, so each rule is a row in a table test
(``tests/unit/test_rollout.py``); the controller feeds it figures and writes the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cluster.errors import InvalidRequestError

PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK, FAILED = "progressing", "paused", "promoted", "rolled_back", "failed"
RUNNING = (PROGRESSING, PAUSED)
PASS, FAIL, WAIT = "pass", "fail", "wait"


class RolloutError(InvalidRequestError):
    """A transition that the rollout's state does not allow, or a bad spec."""

    default_code = "invalid_rollout"


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    stable: str
    candidate: str
    steps: tuple[int, ...] = (10, 25, 50, 100)
    interval_s: float = 60.0
    max_error_rate: float = 0.02
    max_latency_ratio: float = 1.5  # p95 latency and p95 time to first token, candidate / stable
    max_escalation_ratio: float = 1.5  # the quality gate's escalation rate, where a gate ran
    min_requests: int = 20
    failure_limit: int = 2
    # Shadow first: before any user gets the candidate, a share of the model's requests is
    # also sent to it and its answers dropped; that phase is analysed like a step (its
    # figures are the shadow calls'), and a pass starts the weighted steps.
    shadow: bool = False
    shadow_share: float = 0.1

    @property
    def all_steps(self) -> tuple[int, ...]:
        """The candidate's weight at each step: a 0% shadow phase first when ``shadow``."""
        return ((0,) if self.shadow else ()) + tuple(self.steps)

    def problems(self) -> list[str]:
        out = []
        if self.stable == self.candidate:
            out.append(f"the candidate must differ from the stable version {self.stable}")
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) or list(self.steps) != sorted(set(self.steps)):
            out.append(f"steps must rise strictly within 1..100, got {list(self.steps)}")
        elif self.steps[-1] != 100:
            out.append(f"the last step must be 100, got {self.steps[-1]}")
        if self.interval_s <= 0:
            out.append("interval_s must be above 0")
        if not 0 <= self.max_error_rate <= 1:
            out.append("max_error_rate must be within [0, 1]")
        if self.max_latency_ratio <= 0 or self.max_escalation_ratio <= 0:
            out.append("ratios must be above 0")
        if self.min_requests < 0 or self.failure_limit < 1:
            out.append("min_requests must be >= 0 and failure_limit >= 1")
        if not 0 < self.shadow_share <= 1:
            out.append("shadow_share must be within (0, 1]")
        return out


@dataclass(frozen=True)
class Figures:
    """What the gateways recorded for one version over an analysis interval."""

    requests: int = 0
    errors: int = 0
    p95_latency_s: float | None = None
    p95_ttft_s: float | None = None
    gated: int = 0  # answers a quality gate judged
    escalated: int = 0  # of those, the ones that failed it

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.gated if self.gated else None


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    ok: bool


@dataclass(frozen=True)
class Analysis:
    verdict: str
    at: float
    checks: tuple[Check, ...] = ()
    reason: str = ""


# Floors under both sides of a ratio: a stable figure of 0 must not make any candidate
# value an infinite ratio (an escalation rate of 0.5% is not "infinitely" worse), and
# latencies under 50 ms are scheduling noise on a busy node, where 3 ms against 1.5 ms
# once failed a healthy candidate (seen in CI on 2 cores).
_RATIO_FLOOR = {"p95_latency_ratio": 0.05, "p95_ttft_ratio": 0.05, "escalation_ratio": 0.01}


def analyse(spec: RolloutSpec, stable: Figures, candidate: Figures, now: float) -> Analysis:
    """Compare the candidate with the stable version over one interval."""
    if candidate.requests < spec.min_requests:
        return Analysis(WAIT, now, reason=f"{candidate.requests} candidate requests, fewer than min_requests={spec.min_requests}")
    checks = [Check("error_rate", candidate.error_rate, spec.max_error_rate, candidate.error_rate <= spec.max_error_rate)]
    pairs = (
        ("p95_latency_ratio", stable.p95_latency_s, candidate.p95_latency_s, spec.max_latency_ratio),
        ("p95_ttft_ratio", stable.p95_ttft_s, candidate.p95_ttft_s, spec.max_latency_ratio),
        ("escalation_ratio", stable.escalation_rate, candidate.escalation_rate, spec.max_escalation_ratio),
    )
    for name, base, mine, limit in pairs:
        if base is None or mine is None:
            continue  # no figure on one side (no traffic there, or no gate ran): nothing to compare
        ratio = max(mine, _RATIO_FLOOR[name]) / max(base, _RATIO_FLOOR[name])
        checks.append(Check(name, ratio, limit, ratio <= limit))
    failed = [c.name for c in checks if not c.ok]
    if failed:
        return Analysis(FAIL, now, tuple(checks), reason="failed: " + ", ".join(failed))
    return Analysis(PASS, now, tuple(checks))


@dataclass(frozen=True)
class Rollout:
    spec: RolloutSpec
    state: str
    step: int  # index into spec.all_steps
    step_started_at: float
    failures: int = 0  # failed checks in a row
    last: Analysis | None = None
    history: tuple[str, ...] = field(default_factory=tuple)  # one line per transition, for status

    @property
    def candidate_weight(self) -> int:
        if self.state == PROMOTED:
            return 100
        if self.state in (ROLLED_BACK, FAILED):
            return 0
        return self.spec.all_steps[self.step]

    @property
    def shadowing(self) -> bool:
        """Whether the candidate should get shadow traffic now (its shadow phase, running)."""
        return self.state in RUNNING and self.spec.shadow and self.step == 0

    @property
    def weights(self) -> dict[str, int]:
        w = self.candidate_weight
        return {self.spec.candidate: w, self.spec.stable: 100 - w}

    @property
    def finished(self) -> bool:
        return self.state not in RUNNING

    def due(self, now: float) -> bool:
        """Whether the current step's interval is over and an analysis should run."""
        return self.state == PROGRESSING and now - self.step_started_at >= self.spec.interval_s

    def _note(self, now: float, text: str, **changes: Any) -> "Rollout":
        return replace(self, history=(*self.history, f"{now:.3f} {text}")[-50:], **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Rollout":
        spec = RolloutSpec(**{**data["spec"], "steps": tuple(data["spec"]["steps"])})
        last = data.get("last")
        analysis = None
        if last is not None:
            analysis = Analysis(last["verdict"], last["at"], tuple(Check(**c) for c in last["checks"]), last.get("reason", ""))
        return Rollout(spec, data["state"], data["step"], data["step_started_at"], data["failures"], analysis, tuple(data["history"]))


def start(spec: RolloutSpec, now: float) -> Rollout:
    problems = spec.problems()
    if problems:
        raise RolloutError(f"bad rollout for {spec.model}: " + "; ".join(problems))
    r = Rollout(spec, PROGRESSING, 0, now)
    first = f"shadow ({spec.shadow_share:.0%} of requests mirrored)" if spec.shadow else f"{spec.steps[0]}%"
    return r._note(now, f"started {spec.stable} -> {spec.candidate} at {first}")


def advance(r: Rollout, analysis: Analysis) -> Rollout:
    """Apply an analysis of the current step (the controller runs one when ``due``)."""
    if r.state != PROGRESSING:
        raise RolloutError(f"the rollout of {r.spec.model} is {r.state}; only a progressing rollout is analysed")
    now = analysis.at
    if analysis.verdict == WAIT:
        return r._note(now, f"wait at {r.candidate_weight}%: {analysis.reason}", last=analysis, step_started_at=now)
    if analysis.verdict == FAIL:
        failures = r.failures + 1
        if failures >= r.spec.failure_limit:
            return r._note(now, f"failed at {r.candidate_weight}% ({analysis.reason}); rolled back to 0%", state=FAILED,
                           failures=failures, last=analysis)
        return r._note(now, f"check failed at {r.candidate_weight}% ({failures}/{r.spec.failure_limit}): {analysis.reason}",
                       failures=failures, last=analysis, step_started_at=now)
    if r.step == len(r.spec.all_steps) - 1:
        return r._note(now, f"promoted {r.spec.candidate}", state=PROMOTED, failures=0, last=analysis)
    nxt = r.step + 1
    return r._note(now, f"passed at {r.candidate_weight}%; now {r.spec.all_steps[nxt]}%", step=nxt, failures=0, last=analysis,
                   step_started_at=now)


def pause(r: Rollout, now: float) -> Rollout:
    if r.state != PROGRESSING:
        raise RolloutError(f"the rollout of {r.spec.model} is {r.state}; only a progressing rollout can be paused")
    return r._note(now, f"paused at {r.candidate_weight}%", state=PAUSED)


def resume(r: Rollout, now: float) -> Rollout:
    if r.state != PAUSED:
        raise RolloutError(f"the rollout of {r.spec.model} is {r.state}; only a paused rollout can be resumed")
    # The interval restarts: figures from before the pause do not judge the step.
    return r._note(now, f"resumed at {r.candidate_weight}%", state=PROGRESSING, step_started_at=now)


def promote(r: Rollout, now: float) -> Rollout:
    if r.finished:
        raise RolloutError(f"the rollout of {r.spec.model} is {r.state} already")
    return r._note(now, f"promoted {r.spec.candidate} by hand", state=PROMOTED)


def abort(r: Rollout, now: float) -> Rollout:
    if r.finished:
        raise RolloutError(f"the rollout of {r.spec.model} is {r.state} already")
    return r._note(now, "aborted; rolled back to 0%", state=ROLLED_BACK)
