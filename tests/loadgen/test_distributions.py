import math
import random

import pytest

from loadgen.distributions import DistributionError, parse_distribution


def test_parse_and_sample_each_kind() -> None:
    rng = random.Random(1)
    assert parse_distribution("const:5").sample(rng) == 5
    assert parse_distribution("7").sample(rng) == 7
    assert all(2 <= parse_distribution("uniform:2,3").sample(rng) <= 3 for _ in range(100))
    exp = [parse_distribution("exp:2").sample(rng) for _ in range(4000)]
    assert 1.8 < sum(exp) / len(exp) < 2.2
    logn = sorted(parse_distribution("lognormal:100,1.0").sample(rng) for _ in range(4001))
    assert 85 < logn[2000] < 115  # the median is the first argument


def test_bounds_clip_samples() -> None:
    rng = random.Random(2)
    dist = parse_distribution("lognormal:100,3,min=10,max=200")
    values = [dist.sample(rng) for _ in range(2000)]
    assert min(values) == 10 and max(values) == 200
    assert str(dist) == "lognormal:100,3,min=10,max=200"
    assert parse_distribution(str(dist)) == dist


@pytest.mark.parametrize(
    "spec",
    [
        "gauss:1,2",
        "const:",
        "const:1,2",
        "uniform:3,2",
        "lognormal:0,1",
        "exp:-1",
        "const:x",
        "const:1,foo=2",
        "const:1,min=5,max=2",
        f"const:{math.inf}",
    ],
)
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(DistributionError):
        parse_distribution(spec)
