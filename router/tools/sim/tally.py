"""What callers got, counted as the run goes, per origin force and service, and what each
centre carried over the night (samples for the charts)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

WITHIN_S = 10.0  # the national target: 90% of 999 calls answered within 10 s
BIN_S = 60  # per-minute counts, for the worst 15-minute window


@dataclass(slots=True)
class Tally:
    """One origin force and service. Every call offered ends as answered, abandoned (of which
    some at a dead line), shed (an announcement) or still waiting when the night ends."""

    force: str
    service: str
    bins: int
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    dead_line: int = 0  # routed to a centre whose phones were down (included in abandoned)
    shed: int = 0
    waited: int = 0  # found no handler free (answered later or not)
    within: int = 0  # answered within WITHIN_S
    repeats: int = 0  # calls that were a caller trying again
    last_resort: int = 0
    answered_by: dict[str, int] = field(default_factory=dict)
    answered_at: array[float] = field(default_factory=lambda: array("d"))  # when routed
    waits: array[float] = field(default_factory=lambda: array("d"))  # its answer time
    offered_bins: array[int] = field(init=False)
    within_bins: array[int] = field(init=False)
    queued_at_end: int = 0

    def __post_init__(self) -> None:
        self.offered_bins = array("l", [0]) * self.bins
        self.within_bins = array("l", [0]) * self.bins


@dataclass(slots=True)
class Samples:
    """One centre every `sample_s`: calls waiting per lane, aid carried, the router's belief."""

    t: list[float] = field(default_factory=list)
    waiting_999: list[int] = field(default_factory=list)
    waiting_101: list[int] = field(default_factory=list)
    aid: list[int] = field(default_factory=list)
    belief: list[str] = field(default_factory=list)
