"""Occluders as a distribution: drawn niqabs and masks, their exact masks, repeatable draws."""
import numpy as np
import pytest

from occface.data import OcclusionSynthesizer
from occface.data.drawn_occluders import DRAWN_KINDS, FAMILIES, DrawnOccluders
from occface.data.errors import DataError
from occface.data.placement import EYE_CENTER, NOSE_TIP
from occface.data.synth import composite


@pytest.mark.parametrize("kind", DRAWN_KINDS)
def test_the_mask_is_exactly_what_the_occluder_covers(kind):
    # Composited onto a black and onto a white face, a pixel changes by 255 x its coverage: the
    # visibility read back from the two composites is the mask, to rounding.
    layer, name = DrawnOccluders().render(kind, 112, np.random.default_rng(3))
    black, visibility = composite(np.zeros((112, 112, 3), np.uint8), layer)
    white, same = composite(np.full((112, 112, 3), 255, np.uint8), layer)
    np.testing.assert_array_equal(visibility, same)
    seen = (white.astype(np.float32) - black.astype(np.float32)) / 255.0
    np.testing.assert_allclose(seen, np.repeat(visibility[..., None], 3, axis=2), atol=1.5 / 255)
    assert name.startswith(kind)
    assert 0.0 <= visibility.min() and visibility.max() <= 1.0
    # A niqab hides the lower face and leaves the eyes; a mask hides the mouth and leaves the eyes.
    eyes = visibility[int(EYE_CENTER[1]) - 1:int(EYE_CENTER[1]) + 2, 46:66].mean()
    mouth = visibility[90:96, 48:64].mean()
    assert mouth < 0.05, (kind, mouth)
    assert eyes > (0.25 if name == "veil/sheer" else 0.5), (name, eyes)


def test_seeded_draws_repeat_and_differ_between_seeds():
    generator = DrawnOccluders()
    first, name = generator.render("veil", 112, np.random.default_rng(7))
    again, name_again = generator.render("veil", 112, np.random.default_rng(7))
    other, _ = generator.render("veil", 112, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert name == name_again and not np.array_equal(first, other)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_sub_family_appears_in_its_share(family):
    rng = np.random.default_rng(0)
    names = [DrawnOccluders().render(family, 48, rng)[1] for _ in range(300)]
    for sub, share in FAMILIES[family].items():
        seen = names.count(f"{family}/{sub}") / len(names)
        assert abs(seen - share) < 0.08, (sub, seen, share)


def test_draws_vary_in_shape_colour_and_placement():
    rng = np.random.default_rng(1)
    layers = [DrawnOccluders().render("veil/slit", 112, rng)[0] for _ in range(40)]
    visible = np.array([1 - layer[..., 3].mean() for layer in layers])
    colour = np.array([layer[..., :3].sum() / max(layer[..., 3].sum(), 1e-6) for layer in layers])
    assert visible.std() > 0.02 and colour.std() > 0.05
    # The opening follows the eyes: its centre stays near the template's eye line.
    rows = [np.average(np.arange(112), weights=(1 - layer[..., 3])[:, 30:82].sum(1) + 1e-9) for layer in layers]
    assert abs(np.median(rows) - EYE_CENTER[1]) < 25


def test_drawn_kinds_go_through_the_synthesizer_at_any_size():
    synthesizer = OcclusionSynthesizer([], ["veil", "facemask/surgical"])
    face = np.full((224, 224, 3), 128, np.uint8)
    occluded, visibility, name = synthesizer(face, np.random.default_rng(0))
    assert occluded.shape == face.shape and visibility.shape == (224, 224)
    assert name.split("/")[0] in ("veil", "facemask")
    _, visibility, name = synthesizer(face, np.random.default_rng(0), "facemask/surgical")
    assert name == "facemask/surgical" and visibility[int(2 * NOSE_TIP[1]) + 20, 112] < 0.05
    with pytest.raises(DataError, match="unknown occlusion kinds"):
        OcclusionSynthesizer([], ["veil/balaclava"])
    with pytest.raises(DataError, match="unknown drawn occluder"):
        DrawnOccluders().render("veil/balaclava", 112, np.random.default_rng(0))
