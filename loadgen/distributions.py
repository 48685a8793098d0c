"""Random distributions given on the command line as `KIND:ARGS`, e.g. `lognormal:653,1.81,max=22000`.

Kinds: `const:X`, `uniform:LO,HI`, `exp:MEAN`, `lognormal:MEDIAN,SIGMA` (sigma of the log). Optional
`min=`/`max=` clip the sample: real traces have long tails that a bench usually wants bounded.
"""

from __future__ import annotations

import math
import random

import msgspec

_ARITY = {"const": 1, "uniform": 2, "exp": 1, "lognormal": 2}


class DistributionError(ValueError):
    pass


class Distribution(msgspec.Struct, frozen=True):
    kind: str
    args: tuple[float, ...]
    lo: float = -math.inf
    hi: float = math.inf

    def sample(self, rng: random.Random) -> float:
        if self.kind == "const":
            value = self.args[0]
        elif self.kind == "uniform":
            value = rng.uniform(self.args[0], self.args[1])
        elif self.kind == "exp":
            value = rng.expovariate(1.0 / self.args[0]) if self.args[0] > 0 else 0.0
        else:
            value = rng.lognormvariate(math.log(self.args[0]), self.args[1])
        return min(max(value, self.lo), self.hi)

    def sample_int(self, rng: random.Random, floor: int = 0) -> int:
        return max(floor, round(self.sample(rng)))

    def __str__(self) -> str:
        parts = [f"{a:g}" for a in self.args]
        if self.lo != -math.inf:
            parts.append(f"min={self.lo:g}")
        if self.hi != math.inf:
            parts.append(f"max={self.hi:g}")
        return f"{self.kind}:{','.join(parts)}"


def parse_distribution(spec: str) -> Distribution:
    """`KIND:A[,B][,min=X][,max=Y]`; a bare number means `const`."""
    kind, _, rest = spec.strip().partition(":")
    if not rest:
        kind, rest = "const", kind
    if kind not in _ARITY:
        raise DistributionError(f"unknown distribution {kind!r} in {spec!r} (one of {', '.join(_ARITY)})")
    args: list[float] = []
    bounds = {"min": -math.inf, "max": math.inf}
    try:
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            if eq:
                if key not in bounds:
                    raise DistributionError(f"unknown option {key!r} in {spec!r}")
                bounds[key] = float(value)
            else:
                args.append(float(part))
    except ValueError as exc:
        if isinstance(exc, DistributionError):
            raise
        raise DistributionError(f"bad number in distribution {spec!r}") from exc
    if len(args) != _ARITY[kind]:
        raise DistributionError(f"{kind} takes {_ARITY[kind]} argument(s), got {spec!r}")
    if any(not math.isfinite(a) or a < 0 for a in args) or (kind == "lognormal" and args[0] <= 0):
        raise DistributionError(f"arguments of {spec!r} must be finite and non-negative (median > 0)")
    if kind == "uniform" and args[0] > args[1]:
        raise DistributionError(f"uniform needs LO <= HI in {spec!r}")
    if bounds["min"] > bounds["max"]:
        raise DistributionError(f"min > max in {spec!r}")
    return Distribution(kind, tuple(args), bounds["min"], bounds["max"])
