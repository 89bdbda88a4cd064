"""SamplingParams: defaults, normalisation, and one ValueError naming the field for every kind of bad value."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cinfer_runtime.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (16, 1.0, -1, 1.0, 0.0, 1.0)
    assert p.seed is None and p.stop_token_ids is None and p.ignore_eos is False
    assert not p.greedy


def test_greedy_is_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_accepted_edge_values_and_normalisation():
    p = SamplingParams(max_tokens=np.int64(1), temperature=2, top_k=1, top_p=1e-9, min_p=1.0,
                       repetition_penalty=np.float32(0.5), seed=-(2 ** 70), stop_token_ids=(0, np.int32(7)),
                       ignore_eos=True)
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.repetition_penalty) is float
    assert p.temperature == 2.0 and p.top_k == 1 and p.min_p == 1.0 and p.seed == -(2 ** 70)
    assert p.stop_token_ids == [0, 7] and all(type(t) is int for t in p.stop_token_ids)
    assert SamplingParams(stop_token_ids=[]).stop_token_ids == []
    assert SamplingParams(min_p=0.0, top_p=1.0, seed=0).seed == 0


INVALID = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", True), ("max_tokens", None),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", True),
    ("top_k", 0), ("top_k", -2), ("top_k", 3.0), ("top_k", False),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", math.nan), ("top_p", None),
    ("min_p", -1e-9), ("min_p", 1.5), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1, 2.0]), ("stop_token_ids", 5), ("stop_token_ids", "12"),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**{field: value})


@given(max_tokens=st.integers(1, 10 ** 6), temperature=st.floats(0, 100), top_k=st.one_of(st.just(-1), st.integers(1)),
       top_p=st.floats(0, 1, exclude_min=True), min_p=st.floats(0, 1),
       repetition_penalty=st.floats(0, 100, exclude_min=True), seed=st.one_of(st.none(), st.integers()),
       stop_token_ids=st.one_of(st.none(), st.lists(st.integers(0, 2 ** 31))), ignore_eos=st.booleans())
def test_every_valid_combination_is_accepted_unchanged(**kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value
