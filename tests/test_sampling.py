import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from idlm.decoding.sampling import (RowSampling, SamplingParams, distribution, residual_distribution, row_key, sample,
                                   uniforms)

LOGITS = [2.0, 1.0, 0.5, -1.0, 1.5]


def softmax_ref(logits: list[float], keep: set[int] | None = None) -> list[float]:
    keep = set(range(len(logits))) if keep is None else keep
    z = sum(math.exp(x) for i, x in enumerate(logits) if i in keep)
    return [math.exp(x) / z if i in keep else 0.0 for i, x in enumerate(logits)]


def history_tensors(prompt: list[int], generated: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen, counts) as the decoder keeps them: seen = in prompt or output, counts = times generated."""
    seen = torch.zeros(vocab, dtype=torch.bool)
    counts = torch.zeros(vocab)
    for t in prompt + generated:
        seen[t] = True
    for t in generated:
        counts[t] += 1
    return seen, counts


def dist(params: SamplingParams | list[SamplingParams], logits=LOGITS, history=None, row_extra=None) -> torch.Tensor:
    """history: (prompt ids, generated ids); row_extra[r]: tokens row r adds to the generated ones."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    if t.dim() == 1:
        t = t[None]
    rows = t.shape[0]
    plist = params if isinstance(params, list) else [params] * rows
    seen = counts = None
    if history is not None:
        extra = row_extra or [[]] * rows
        pairs = [history_tensors(history[0], history[1] + extra[r], t.shape[1]) for r in range(rows)]
        seen, counts = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    return distribution(t, RowSampling(plist, "cpu", seen, counts))


def check(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=1e-5)


# p = softmax(LOGITS) = [0.4727, 0.1739, 0.1055, 0.0235, 0.2867] (sorted: 0, 4, 1, 2, 3)


def test_plain_softmax():
    check(dist(SamplingParams())[0], softmax_ref(LOGITS))


def test_temperature():
    check(dist(SamplingParams(temperature=0.5))[0], softmax_ref([4.0, 2.0, 1.0, -2.0, 3.0]))


def test_tiny_temperature_does_not_overflow():
    p = dist(SamplingParams(temperature=1e-30))[0]
    check(p, [1.0, 0.0, 0.0, 0.0, 0.0])


def test_top_k():
    check(dist(SamplingParams(top_k=2))[0], softmax_ref(LOGITS, {0, 4}))
    check(dist(SamplingParams(top_k=-1))[0], softmax_ref(LOGITS))
    check(dist(SamplingParams(top_k=50))[0], softmax_ref(LOGITS))
    # ties at the k-th value are all kept
    check(dist(SamplingParams(top_k=1), [1.0, 0.0, 1.0])[0], [0.5, 0.0, 0.5])


def test_top_p():
    # cumulative mass of tokens ranked above: 0 -> 0, 4 -> .4727, 1 -> .7594, 2 -> .9333, 3 -> .9388
    check(dist(SamplingParams(top_p=0.7))[0], softmax_ref(LOGITS, {0, 4}))
    check(dist(SamplingParams(top_p=0.8))[0], softmax_ref(LOGITS, {0, 4, 1}))
    check(dist(SamplingParams(top_p=0.1))[0], softmax_ref(LOGITS, {0}))


def test_min_p():
    # p / p_max = exp(l - 2): [1, .368, .223, .050, .607]
    check(dist(SamplingParams(min_p=0.3))[0], softmax_ref(LOGITS, {0, 1, 4}))
    check(dist(SamplingParams(min_p=0.5))[0], softmax_ref(LOGITS, {0, 4}))
    check(dist(SamplingParams(min_p=1.0))[0], softmax_ref(LOGITS, {0}))


def test_composition_order():
    # T=2: [1, .5, .25, -.5, .75]; top_k=4 drops 3; renormalized p over {0,4,1,2}:
    # e^1, e^.75, e^.5, e^.25 / 7.768 = [.3499, .2725, .2122, .1653]; mass above 2: .8347 -> top_p=.8 drops 2;
    # min_p=.7: exp(.5 - 1) = .607 < .7 drops 1 -> {0, 4}
    params = SamplingParams(temperature=2.0, top_k=4, top_p=0.8, min_p=0.7)
    check(dist(params)[0], softmax_ref([1.0, 0.5, 0.25, -0.5, 0.75], {0, 4}))
    # without min_p token 1 survives
    params = SamplingParams(temperature=2.0, top_k=4, top_p=0.8)
    check(dist(params)[0], softmax_ref([1.0, 0.5, 0.25, -0.5, 0.75], {0, 1, 4}))


def history():
    return [0, 2], [1, 1, 3]  # prompt, generated


def test_history_tensors():
    seen, counts = history_tensors(*history(), 5)
    assert seen.tolist() == [True, True, True, True, False]
    assert counts.tolist() == [0.0, 2.0, 0.0, 1.0, 0.0]


def test_repetition_penalty():
    # seen {0,1,2,3}: positive / 2, negative * 2
    check(dist(SamplingParams(repetition_penalty=2.0), history=history())[0], softmax_ref([1.0, 0.5, 0.25, -2.0, 1.5]))


def test_presence_and_frequency_penalties():
    # generated counts {1: 2, 3: 1}; the prompt tokens 0, 2 are not penalized
    check(dist(SamplingParams(presence_penalty=0.25), history=history())[0], softmax_ref([2.0, 0.75, 0.5, -1.25, 1.5]))
    check(dist(SamplingParams(frequency_penalty=0.5), history=history())[0], softmax_ref([2.0, 0.0, 0.5, -1.5, 1.5]))


def test_all_penalties_with_row_extra_and_filters():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    logits = [LOGITS] * 3
    p = dist(params, logits, history=history(), row_extra=[[], [4], [3, 4, 4]])
    # row 0: committed history only
    check(p[0], softmax_ref([1.0, -0.75, 0.25, -2.75, 1.5]))
    # row 1: token 4 once more: 1.5 / 2 - .25 - .5
    check(p[1], softmax_ref([1.0, -0.75, 0.25, -2.75, 0.0]))
    # row 2: token 3 twice in all (-1 * 2 - .25 - 1), token 4 twice (.75 - .25 - 1)
    check(p[2], softmax_ref([1.0, -0.75, 0.25, -3.25, -0.5]))
    # penalties come before temperature and the filters
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5, temperature=0.5, top_k=2)
    p = dist(params, logits, history=history(), row_extra=[[], [4], [3, 4, 4]])
    check(p[0], softmax_ref([2.0, -1.5, 0.5, -5.5, 3.0], {0, 4}))
    check(p[1], softmax_ref([2.0, -1.5, 0.5, -5.5, 0.0], {0, 2}))


def test_mixed_rows_equal_each_row_alone():
    """One call over rows with different parameters == each row through the pipeline alone."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 2
    plist = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5),
             SamplingParams(top_p=0.8), SamplingParams(min_p=0.1, temperature=1.3),
             SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=-0.3),
             SamplingParams(temperature=0.9, top_k=60, top_p=0.95, min_p=0.02), SamplingParams()]
    hist = ([3, 7, 7], [7, 9, 11])
    extra = [[], [9], [9, 20], [1], [9, 20, 9], [], [4]]
    together = dist(plist, logits, hist, extra)
    for r, p in enumerate(plist):
        torch.testing.assert_close(together[r], dist(p, logits[r], hist, [extra[r]])[0])


def test_greedy_one_hot():
    check(dist(SamplingParams(temperature=0, top_k=3, top_p=0.5))[0], [1.0, 0.0, 0.0, 0.0, 0.0])
    # ties: lowest index
    check(dist(SamplingParams(temperature=0), [0.0, 3.0, 3.0])[0], [0.0, 1.0, 0.0])
    # argmax of the penalized logits: token 0 is seen, 2 / 2 < 1.5
    check(dist(SamplingParams(temperature=0, repetition_penalty=2.0), history=history())[0], [0.0, 0.0, 0.0, 0.0, 1.0])


def test_bfloat16_logits_computed_in_float32():
    logits = torch.tensor([LOGITS], dtype=torch.bfloat16)
    p = dist(SamplingParams(temperature=0.7), logits)
    check(p[0], softmax_ref([x / 0.7 for x in LOGITS]))


STAT_PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("params", STAT_PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampling_matches_distribution(params):
    n = 200_000
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(7)) * 1.5
    p = dist(params, logits)[0]
    support = p > 0
    if params.top_k or params.top_p < 1 or params.min_p > 0:
        assert not support.all(), "filter should cut something for the test to mean anything"
    tokens = sample(p.expand(n, 8), torch.tensor([row_key(1234, i, 2) for i in range(n)]))
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[~support].sum() == 0
    expected = p[support].double()
    expected = expected / expected.sum() * n
    assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3


def test_sample_never_draws_zero_probability():
    probs = torch.zeros(10_000, 1000)
    probs[:, 999] = 1e-30
    probs[:, 3] = 1.0
    tokens = sample(probs, torch.arange(10_000))
    assert set(tokens.tolist()) <= {3, 999}


def test_greedy_sample_is_argmax():
    p = dist(SamplingParams(temperature=0)).expand(10_000, 5)
    assert (sample(p, torch.arange(10_000)) == 0).all()


def test_uniforms_are_uniform_keyed_and_hashed_like_the_python_reference():
    keys = torch.tensor([row_key(7, i, 2) for i in range(2000)])
    u = uniforms(keys, 50)
    assert u.min() > 0.0 and u.max() < 1.0
    flat = u.reshape(-1).numpy()
    assert chisquare(np.histogram(flat, bins=50, range=(0, 1))[0]).pvalue > 1e-3
    # neighbouring elements, keys of neighbouring positions, other streams and other seeds are uncorrelated
    other_stream = uniforms(torch.tensor([row_key(7, i, 3) for i in range(2000)]), 50).reshape(-1).numpy()
    other_seed = uniforms(torch.tensor([row_key(8, i, 2) for i in range(2000)]), 50).reshape(-1).numpy()
    for a, b in ((flat[:-1], flat[1:]), (u[:-1].reshape(-1).numpy(), u[1:].reshape(-1).numpy()),
                 (flat, other_stream), (flat, other_seed)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert row_key(42, 10, 1) == row_key(42, 10, 1)
    assert len({row_key(42, 10, 1), row_key(43, 10, 1), row_key(42, 11, 1), row_key(42, 10, 2)}) == 4
    # the device hash equals the integer reference: int64 products wrap mod 2^64 as assumed
    from idlm.decoding.sampling import _GOLDEN, _mix64

    k = row_key(3, 5, 1)
    ref = (_mix64((k + 7 * _GOLDEN) & ((1 << 64) - 1)) >> 41) & ((1 << 23) - 1)
    assert float(uniforms(torch.tensor([k]), 7)[0, 6]) == (ref + 0.5) / (1 << 23)


def test_draws_are_robust_to_tiny_logit_differences():
    """Batched and lone forwards round differently: a 1e-6 relative change of every probability almost never
    changes a draw over a large vocabulary (the exponential race only flips at near-ties)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(400, 49152, generator=g), -1)
    noisy = p * (1 + 1e-6 * torch.randn(p.shape, generator=g))
    keys = torch.arange(400)
    assert (sample(p, keys) != sample(noisy, keys)).sum() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_normalization():
    params = SamplingParams(stop="###", stop_token_ids=(5, 6), temperature=0)
    assert params.stop == ["###"]
    assert params.stop_token_ids == [5, 6]
    assert params.greedy and not params.uses_penalties
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(presence_penalty=0.1).uses_penalties


def test_residual_distribution():
    check(residual_distribution(torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.3, 0.1, 0.6])), [2 / 3, 1 / 3, 0.0])
    check(residual_distribution(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])), [1.0, 0.0, 0.0])
    p = torch.tensor([0.25, 0.75, 0.0])
    check(residual_distribution(p, p.clone()), p.tolist())  # all-zero residual falls back to p
    batched = residual_distribution(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([[0.5, 0.5], [0.1, 0.9]]))
    check(batched, [[0.5, 0.5], [1.0, 0.0]])


def test_residual_recovers_target_distribution():
    # draft x ~ q, accept with min(1, p/q), else resample from the residual: the output follows p
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(16, generator=g), -1).double()
    q = torch.softmax(torch.randn(16, generator=g), -1).double()
    accepted = torch.minimum(p, q)
    out = accepted + (1 - accepted.sum()) * residual_distribution(p, q)
    torch.testing.assert_close(out, p)


def test_top_p_over_a_large_vocabulary_matches_a_full_sort():
    """The nucleus is found among the top candidates first; a row with a wide nucleus falls back to a full
    sort. Both give the set a full sort gives."""
    from idlm.decoding.sampling import TOP_P_CANDIDATES, _top_p_drop

    g = torch.Generator().manual_seed(0)
    v = 4 * TOP_P_CANDIDATES
    peaked = torch.randn(3, v, generator=g) * 4
    flat = torch.randn(2, v, generator=g) * 0.1  # nucleus far wider than the candidates
    top_p = torch.tensor([0.5, 0.9, 0.99])

    def reference(logits, p):
        probs = torch.softmax(logits, -1)
        ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, (ranked.cumsum(-1) - ranked) < p[:, None])
        return ~keep

    assert torch.equal(_top_p_drop(peaked, top_p), reference(peaked, top_p))
    assert (~_top_p_drop(flat, top_p[:2])).sum(-1).min() > TOP_P_CANDIDATES
    assert torch.equal(_top_p_drop(flat, top_p[:2]), reference(flat, top_p[:2]))
