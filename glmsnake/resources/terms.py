"""An estimate is a list of terms: a name, bytes, and the inputs that gave them (shown by --explain)."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    how: str = ""


@dataclass
class Estimate:
    """What one budget (a GPU of a stage, a node's host memory, base_dir's disk) must hold."""

    what: str
    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, nbytes: float, how: str = "") -> None:
        self.terms.append(Term(name, float(nbytes), how))

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def count(n: float) -> str:
    """A parameter count as people say it: 356.8 B, 267.2 K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f}"
