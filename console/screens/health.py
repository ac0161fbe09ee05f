"""The PBX view: every registrar target and push provider with its health, instances and last error."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import Static

from console.feed import FeedError
from console.screens.common import ConsoleScreen
from contract.documents import HealthTarget, HealthTargets
from widgets.format import ago, fit, thousands

#: seconds between two reads of the targets while the view is shown
POLL_INTERVAL = 5.0
STATE_STYLE = {"up": "bold $success", "degraded": "bold $warning", "down": "bold $error", "unknown": "$text-muted"}
SECTIONS = (("pbx", "Registrar targets"), ("provider", "Push providers"))


class PbxScreen(ConsoleScreen):
    """Polls ``/v1/health/targets`` while shown; one line per target."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: HealthTargets | None = None
        self._read_at: float | None = None
        self._busy = False

    def body(self) -> ComposeResult:
        yield Static("loading…", id="health-targets")

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        if not self._busy and (self._read_at is None or now - self._read_at >= POLL_INTERVAL):
            self._busy = True
            self._read_at = now
            self.run_worker(self._read(), group="health", exit_on_error=False)
        elif self.targets is not None:
            self.query_one("#health-targets", Static).update(render_targets(self.targets, now))

    async def _read(self) -> None:
        try:
            self.targets = await self.console.feed.health_targets()
        except FeedError as exc:
            self.query_one("#health-targets", Static).update(Content(f"cannot read the targets: {exc}"))
            return
        finally:
            self._busy = False
        self.query_one("#health-targets", Static).update(render_targets(self.targets, self.console.now()))


def render_targets(targets: HealthTargets, now: float) -> Content:
    parts: list[str | tuple[str, str]] = []
    for subject, title in SECTIONS:
        rows = [t for t in targets.targets if t.subject == subject]
        parts += [(title, "bold"), "\n"]
        if not rows:
            parts += [("  none known yet", "$text-muted"), "\n"]
        for target in rows:
            parts += _line(target, now)
        parts.append("\n")
    return Content.assemble(*parts)


def _line(target: HealthTarget, now: float) -> list[str | tuple[str, str]]:
    line: list[str | tuple[str, str]] = [
        "  ", (fit(target.state, 9), STATE_STYLE.get(target.state, "")), fit(target.target, 32),
        f" {thousands(target.instances):>7} inst  since {fit(ago(target.since, now), 8)}"]
    if target.last_error:
        line += ["  ", (f"{target.last_error} ({ago(target.last_error_at, now)})", "$error")]
    return [*line, "\n"]
