"""A row of labelled sparklines (``textual.widgets.Sparkline``) fed with plain number series."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline


class SparkPanel(Horizontal):
    """One labelled sparkline per series; :meth:`show` replaces the data of one series."""

    DEFAULT_CSS = """
    SparkPanel {
        height: 3;
        background: $surface;
        & > Vertical { width: 1fr; height: 3; padding: 0 1; }
        & Label { height: 1; width: 1fr; color: $text-muted; }
        & Sparkline { height: 2; width: 1fr; }
    }
    """

    def __init__(self, series: Sequence[tuple[str, str]], *, id: str | None = None,
                 classes: str | None = None) -> None:
        """``series``: (key, title) pairs, in display order."""
        super().__init__(id=id, classes=classes)
        self.series = list(series)
        self._shown: dict[str, tuple[str, list[float]]] = {}

    def compose(self) -> ComposeResult:
        for key, title in self.series:
            with Vertical(id=f"spark-{key}"):
                yield Label(title, id=f"spark-{key}-label")
                yield Sparkline([], id=f"spark-{key}-line")

    def show(self, key: str, data: Sequence[float], caption: str) -> None:
        """Only what changed is redrawn; the label and line keep their size (no new layout)."""
        title = dict(self.series)[key]
        text = f"{title}  {caption}"
        shown = self._shown.get(key)
        values = list(data)
        if shown is not None and shown[0] == text and shown[1] == values:
            return
        self._shown[key] = (text, values)
        if shown is None or shown[0] != text:
            self.query_one(f"#spark-{key}-label", Label).update(text, layout=False)
        if shown is None or shown[1] != values:
            # The line scales from its series' minimum: with a 0 in the series it starts at zero, so
            # 33 → 34 is a step, not a full swing. (With more values than columns the 0 shares the first
            # column with real ones and the column's maximum is drawn; with fewer it is one empty bar.)
            self.query_one(f"#spark-{key}-line", Sparkline).data = [0.0, *values] if values else values
