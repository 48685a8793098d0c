"""The sampler draws from the tempered, nucleus-filtered distribution, reproducibly per (seed, position)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # the whole module needs it: skipped without

from engines.runner import SamplingParams
from engines.torch.sampler import Sampler
from tests.engines.conftest import torch_device

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def on_device(logits: torch.Tensor) -> torch.Tensor:
    """The sampler is handed the model's logits where the model runs; expectations stay on the CPU."""
    return logits.to(torch_device())


def draws(params: SamplingParams, count: int = 3000) -> torch.Tensor:
    sampler = Sampler(seed=0)
    logits = on_device(LOGITS)
    tokens = [sampler.sample(logits, [params], [n])[0] for n in range(count)]
    return torch.bincount(torch.tensor(tokens), minlength=LOGITS.shape[1]).float() / count


def test_draws_follow_the_tempered_softmax() -> None:
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(LOGITS[0] / temperature, dim=-1)
        got = draws(SamplingParams(temperature=temperature, seed=11))
        assert 0.5 * (got - expected).abs().sum() < 0.05, (temperature, got, expected)


def test_top_p_keeps_only_the_nucleus_renormalised() -> None:
    probs = torch.softmax(LOGITS[0], dim=-1)  # ~0.53, 0.20, 0.12, 0.07, ...
    got = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3))
    # 0.53 < 0.7, 0.53 + 0.20 >= 0.7: the nucleus is the two most likely tokens
    assert got[2:].sum() == 0
    expected = probs[:2] / probs[:2].sum()
    assert (got[:2] - expected).abs().max() < 0.05


def test_same_seed_and_position_same_token_whatever_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler(0).sample(on_device(LOGITS), [params], [n])[0] for n in range(50)]
    batch_logits = on_device(torch.cat([LOGITS.flip(-1), LOGITS, LOGITS * 2]))
    other = SamplingParams(temperature=1.0, seed=7)
    in_batch = [Sampler(99).sample(batch_logits, [other, params, other], [n, n, 0])[1] for n in range(50)]
    assert alone == in_batch
    assert len(set(alone)) > 1


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 5
    assert Sampler(0).sample(on_device(logits), params, [0] * 5) == logits.argmax(-1).tolist()
