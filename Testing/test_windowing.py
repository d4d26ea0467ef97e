"""Intensity normalisation: the CT window math, overrides, and that the caller's array is untouched."""

import numpy as np
import pytest

from unetseg_engine.errors import UNetSegError
from unetseg_engine.preprocess import normalize

CT = {"method": "ct_window", "level": 40, "width": 400}


@pytest.mark.parametrize("hu, expected", [(-1024, 0.0), (-160, 0.0), (40, 0.5), (140, 0.75),
                                          (240, 1.0), (3000, 1.0)])
def test_ct_window_clips_to_level_plus_minus_half_width_then_scales(hu, expected):
    out = normalize(np.array([hu], np.int16), CT)
    assert out.dtype == np.float32
    assert out[0] == pytest.approx(expected)


def test_user_window_overrides_the_model_window_for_that_call_only():
    x = np.array([-1000.0, 0.0, 500.0, 1000.0], np.float32)
    lung = normalize(x, CT, window=(-600, 1500))  # [-1350, 150]
    assert lung == pytest.approx([(-1000 + 1350) / 1500, 1350 / 1500, 1.0, 1.0])
    assert normalize(x, CT)[1] == pytest.approx(0.4)  # the model's own window again


def test_normalisation_never_modifies_the_input():
    x = np.array([-2000.0, 40.0, 2000.0], np.float32)
    before = x.copy()
    normalize(x, CT)
    normalize(x, {"method": "zscore"})
    np.testing.assert_array_equal(x, before)


def test_zscore_and_percentile():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, size=10000).astype(np.float32)
    z = normalize(x, {"method": "zscore"})
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1, abs=1e-3)
    p = normalize(x, {"method": "percentile", "lower": 1, "upper": 99})
    assert float(p.min()) == 0.0 and float(p.max()) == 1.0


def test_non_positive_width_is_refused():
    with pytest.raises(UNetSegError, match="width"):
        normalize(np.zeros(3), CT, window=(40, 0))
