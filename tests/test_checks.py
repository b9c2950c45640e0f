"""avex.checks: the argument checks every layer shares (here, the ones no single caller's tests cover whole)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from avex.checks import check_pixel_norm, is_real

RGB = (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "mean, std, extra, message",
    [
        ((), RGB, {}, "mean must be finite numbers, one per channel, got ()"),
        ("0.5", RGB, {}, "mean must be finite numbers, one per channel, got '0.5'"),
        ((0.5, float("nan"), 0.5), RGB, {}, "mean must be finite numbers, one per channel, got (0.5, nan, 0.5)"),
        ((True, False, True), RGB, {}, "mean must be finite numbers, one per channel, got (True, False, True)"),
        ([10**400], [0.5], {}, "mean must be finite numbers, one per channel, got [1000"),
        (RGB, (0.5, 0.0, 0.5), {}, "std must be finite numbers, one per channel, each > 0 (pixels are divided by it)"),
        (RGB, (0.5, "x", 0.5), {}, "std must be finite numbers, one per channel, each > 0"),
        (RGB, (0.5, 0.5), {}, "mean and std must have one value per channel each, got (0.5, 0.5, 0.5) and (0.5, 0.5)"),
        (
            (0.5,),
            RGB,
            dict(channels=1),
            "std must be 1 finite number(s), one per channel (in_chans=1), each > 0 (pixels are divided by it), got",
        ),
        (RGB, RGB, dict(channels=1, names=("--mean", "--std")), "--mean must be 1 finite number(s)"),
        (
            (0.5, 0.5),
            None,
            dict(channels=3, one_for_all=True),
            "mean must be 3 finite number(s), one per channel (in_chans=3), or one for every channel, got (0.5, 0.5)",
        ),
        (
            (0.5, 0.5),
            None,
            dict(channels=3, channels_text="--in-chans 3", fix="give three"),
            "mean must be 3 finite number(s), one per channel (--in-chans 3), got (0.5, 0.5); give three",
        ),
    ],
)
def test_a_pixel_normalisation_that_does_not_fit_is_refused(mean: Any, std: Any, extra: Any, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_pixel_norm(mean, std, **extra)
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize(
    "mean, std, extra",
    [
        (RGB, [0.2, 0.3, 0.4], {}),  # a list (a JSON config's) or a tuple
        ((np.float32(0.5), 1, 0.5), RGB, dict(channels=3)),  # numpy's numbers and ints are real numbers
        ((0.5,), RGB, dict(channels=3, one_for_all=True)),  # one value for every channel where the caller allows it
        ((0.5,), (0.5, 0.4, 0.3), dict(one_for_all=True)),
        (None, None, dict(channels=3)),  # not given: the model's own
        (None, (0.5,), dict(channels=1)),
    ],
)
def test_a_pixel_normalisation_that_fits_is_accepted(mean: Any, std: Any, extra: Any) -> None:
    check_pixel_norm(mean, std, **extra)


def test_an_int_too_large_for_a_float_is_not_a_real_number() -> None:
    assert not is_real(10**400) and is_real(10**300) and not is_real(float("inf"))
