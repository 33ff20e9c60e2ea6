"""The offline photo set, its labels and the ImageNet class list."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.data import imagenet, items, photos
from edgekit.errors import EdgekitError


def test_imagenet_class_list() -> None:
    names = imagenet.classes()
    assert len(names) == 1000
    assert (names[0], names[281], names[652], names[999]) == (
        "tench",
        "tabby",
        "military uniform",
        "toilet tissue",
    )
    assert imagenet.index("espresso") == 967
    with pytest.raises(EdgekitError, match="ambiguous"):
        imagenet.index("crane")
    with pytest.raises(EdgekitError, match="not an ImageNet class"):
        imagenet.index("motorcycle")


def test_splits_are_disjoint_and_well_formed() -> None:
    evaluation = items("photos", "eval")
    calibration = items("photos", "calib")
    assert {item.name for item in evaluation}.isdisjoint(item.name for item in calibration)
    assert len(evaluation) == len(photos.labels()["labelled"]) >= 7
    assert len(calibration) == len(photos.labels()["unlabelled"]) + 200
    for item in evaluation + calibration[:6]:
        assert item.raw.dtype == np.uint8 and item.raw.ndim == 3 and item.raw.shape[2] == 3, item.name
    assert all(isinstance(item.target, tuple) and item.target for item in evaluation)
    assert all(item.target is None for item in calibration)
    assert items("photos", "calib", 3)[-1].name == calibration[2].name


def test_labels_match_class_names() -> None:
    assert photos.targets()["chelsea"] == (281, 282, 285)
    assert photos.targets()["coffee"] == (967, 968)


def test_grey_photos_become_rgb() -> None:
    camera = photos.photo("camera")
    assert camera.shape == (512, 512, 3)
    assert np.array_equal(camera[..., 0], camera[..., 2])
    assert photos.faces().shape == (200, 25, 25, 3)


def test_is_correct_accepts_any_listed_class() -> None:
    logits = np.zeros(1000)
    logits[282] = 5.0
    assert photos.is_correct(logits, (281, 282, 285))
    assert not photos.is_correct(logits, (967,))
    assert photos.is_correct(logits, 282)
    with pytest.raises(EdgekitError, match="unknown photo"):
        photos.photo("mona_lisa")
