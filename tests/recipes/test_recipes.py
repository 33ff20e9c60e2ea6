from pathlib import Path

import pytest

from edgekit import recipes
from edgekit.errors import EdgekitError


def test_builtin_fp32_loads_with_defaults():
    recipe = recipes.load("fp32")
    assert recipe.transform == "identity"
    assert recipe.verify.min_sqnr_db == 40.0
    assert "fp32" in recipes.names()


def test_overrides_are_typed(tmp_path: Path):
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\ntransform = "identity"\n[verify]\nsamples = 4\n')
    recipe = recipes.load(str(path), recipes.parse_overrides(["verify.samples=16", "verify.min_sqnr_db=12.5"]))
    assert recipe.verify.samples == 16 and recipe.verify.min_sqnr_db == 12.5


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ('name = "r"\ntransform = "nope"\n', {}, "transform 'nope' is not one of"),
        ('name = "r"\ntransform = "identity"\n[settings]\nfoo = 1\n', {}, "unknown setting 'foo'"),
        ('name = "r"\ntransform = "identity"\n[verify]\nsamples = "many"\n', {}, "expected int"),
        ('name = "r"\ntransform = "identity"\n', {"verify.samples": "x"}, "expected int"),
        ('name = "r"\ntransform = "identity"\nstray = 1\n', {}, "unknown field 'stray'"),
        ('name = "r\ntransform = ', {}, "not valid TOML"),
    ],
)
def test_malformed_recipes_are_clear_errors(tmp_path: Path, text, overrides, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(EdgekitError, match=message):
        recipes.load(str(path), overrides)


def test_unknown_recipe_and_bad_set_syntax():
    with pytest.raises(EdgekitError, match="unknown recipe 'nope'"):
        recipes.load("nope")
    with pytest.raises(EdgekitError, match="key=value"):
        recipes.parse_overrides(["novalue"])


@pytest.mark.parametrize("spelling", ["5,3,1", "[5, 3, 1]"])
def test_list_settings_accept_plain_and_toml_spelling(spelling: str):
    recipe = recipes.load("snn-iir", recipes.parse_overrides([f"ladder={spelling}", "epochs=[1,1,2]"]))
    assert recipe.settings.ladder == [5, 3, 1]
    assert recipe.settings.epochs == [1.0, 1.0, 2.0]
