"""Steer the predicted budget until a candidate *measures* inside the target window.

The search optimises against a cost model; the model ranks policies well but
misprices them by a few to tens of percent (untuned kernels are step-wise in
the channel count, whole models fuse and add overhead). Each measured candidate
is a point ``(predicted cost, measured cost)``. Measured cost rises with the
predicted cost, so the points that measured below the window and those that
measured above it bracket the predicted budget we want: we interpolate between
the tightest pair (regula falsi, kept off the bracket's ends so that it always
shrinks) and, with only one side known, rescale by measured/predicted.

>>> bracket = BudgetBracket(budget=1.0, tolerance=0.05, ceiling=10.0)
>>> bracket.add(predicted=1.0, measured=1.4)   # the model under-predicts by 40 %
>>> round(bracket.next(), 3)
0.714
>>> bracket.add(predicted=0.714, measured=0.8)
>>> 0.714 < bracket.next() < 1.0
True
>>> bracket.add(predicted=0.85, measured=1.02)
>>> bracket.hit()
True
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BudgetBracket:
    """Measured points of one search and the next predicted budget to try.

    Args:
        budget: the measured cost we aim at.
        tolerance: the window is ``budget · (1 ± tolerance)``.
        ceiling: no predicted budget above this (the uncompressed model's predicted cost).
    """

    budget: float
    tolerance: float
    ceiling: float
    points: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.budget <= 0 or self.ceiling <= 0:
            raise ValueError(f"budget and ceiling must be positive, got {self.budget} and {self.ceiling}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")

    @property
    def low(self) -> float:
        return self.budget * (1 - self.tolerance)

    @property
    def high(self) -> float:
        return self.budget * (1 + self.tolerance)

    def add(self, predicted: float, measured: float) -> None:
        self.points.append((float(predicted), float(measured)))

    def hit(self) -> bool:
        """Some candidate measured inside the window."""
        return any(self.low <= m <= self.high for _, m in self.points)

    def anchors(self) -> list[int]:
        """Indices (in the order added) of the points that bracket the window most tightly."""
        under = [i for i, p in enumerate(self.points) if p[1] < self.low]
        over = [i for i, p in enumerate(self.points) if p[1] > self.high]
        out = []
        if under:
            out.append(max(under, key=lambda i: self.points[i]))
        if over:
            out.append(min(over, key=lambda i: self.points[i]))
        return out

    def next(self) -> float:
        """The predicted budget to search next."""
        if not self.points:
            return min(self.budget, self.ceiling)
        under = [p for p in self.points if p[1] < self.low]
        over = [p for p in self.points if p[1] > self.high]
        below = max(under, default=None)  # largest predicted cost that still measured too cheap
        above = min(over, default=None)  # smallest predicted cost that measured too dear
        if below is not None and above is not None and below[0] < above[0]:
            (p0, m0), (p1, m1) = below, above
            guess = p0 + (self.budget - m0) * (p1 - p0) / (m1 - m0)
            margin = 0.1 * (p1 - p0)
            guess = min(max(guess, p0 + margin), p1 - margin)
        elif below is not None and above is not None:  # noise broke monotonicity: split the difference
            guess = (below[0] + above[0]) / 2
        else:
            p, m = below if below is not None else above  # type: ignore[misc]
            guess = p * self.budget / m
        return min(guess, self.ceiling)
