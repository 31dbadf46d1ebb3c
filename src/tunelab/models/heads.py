"""What model head a task's formulation needs: a task returns a ``HeadSpec`` and loading builds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class HeadSpec:
    kind: Literal["sequence", "token", "qa", "seq2seq"]  # seq2seq: an encoder-decoder LM (no new head)
    labels: list[str] = field(default_factory=list)
    # Called on the loaded model (e.g. to map the loop's ``labels`` onto a head's own arguments).
    install: Callable | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.kind != "qa" else 2
