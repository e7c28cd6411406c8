"""Why an update was refused, with the lifecycle step it stopped at.

    UpdateRefused(step, reason, permanent)     an AgentError; `step` is one of the report contract's steps
                                               (contract.report.STEPS: preflight, download, verify, install,
                                               build, warmup, switch, ...); `permanent` refusals are not retried for the
                                               same bundle digest (a bad signature stays bad), the others are
                                               (disk full, fleet gone) at the next sync
"""

from __future__ import annotations

from ..errors import AgentError


class UpdateRefused(AgentError):
    status = 409

    def __init__(self, step: str, reason: str, *, permanent: bool = True, verdict: bool | None = None) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        self.permanent = permanent
        #: a refusal of what was received (reported as install_refused), not weather (install_failed);
        #: bytes that failed their hash on the way are refused yet fetched again next time
        self.verdict = permanent if verdict is None else verdict
