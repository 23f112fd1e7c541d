"""The noise schedule in the paper's direction, and the pitfalls of docs/noprop.md."""
import numpy as np
import pytest

from edgeprop.errors import BundleError
from edgeprop.schedule import NoiseSchedule


@pytest.mark.parametrize("T", [2, 10, 50])
def test_alpha_bar_increases_and_weights_positive_finite(T):
    s = NoiseSchedule.cosine(T).check()
    assert len(s.alpha_bar) == T + 1
    assert np.all(np.diff(s.alpha_bar) > 0), "t=0 must be noise and t=T clean"
    assert s.alpha_bar[0] < 1e-3 and s.alpha_bar[-1] > 0.999
    assert np.all(np.isfinite(s.weights)) and np.all(s.weights > 0)
    assert s.weights.max() <= 5.0


def test_weights_follow_the_snr_differences():
    s = NoiseSchedule.cosine(10, eta=0.1, max_weight=1e9)
    snr = s.alpha_bar / (1 - s.alpha_bar)
    np.testing.assert_allclose(s.weights, 10 / 2 * 0.1 * (snr[1:] - snr[:-1]))


def test_inference_coefficients_are_the_flipped_ddpm_posterior():
    """z_t | z_{t-1}, u has mean a_t u + b_t z_{t-1} and variance c_t; check by moment matching."""
    s = NoiseSchedule.cosine(10)
    for t in range(1, 11):
        a, b, c = s.coefficients(t)
        ab_t, ab_p = s.alpha_bar[t], s.alpha_bar[t - 1]
        # Marginalising z_{t-1} ~ q(z_{t-1}|u) must give back q(z_t|u) = N(√ᾱ_t u, 1-ᾱ_t).
        assert a + b * np.sqrt(ab_p) == pytest.approx(np.sqrt(ab_t), rel=1e-9)
        assert b ** 2 * (1 - ab_p) + c == pytest.approx(1 - ab_t, rel=1e-9)
        assert c > 0


def test_an_unflipped_ddpm_schedule_is_rejected():
    s = NoiseSchedule.cosine(10)
    with pytest.raises(BundleError, match="increase"):
        NoiseSchedule(s.alpha_bar[::-1].copy(), 0.1, 5.0).check()


def test_json_round_trip():
    s = NoiseSchedule.cosine(7, eta=0.3)
    back = NoiseSchedule.from_json(s.to_json())
    np.testing.assert_array_equal(back.alpha_bar, s.alpha_bar)
    assert back.eta == 0.3
