"""The Wikipedia excerpt: markup stripping, the fixed article split, the token stream."""

from __future__ import annotations

import pytest

from edgekit.data import items
from edgekit.data.wikipedia import split_of, strip_markup, token_stream
from edgekit.errors import EdgekitError

WIKITEXT = """{{Infobox thing|name={{nested|x}}|size=3}}
'''Edge''' is a ''small'' [[Computer|computing]] device<ref name="a">S</ref> used at the [[edge]].<ref/>
[[File:Edge.jpg|thumb|A [[device]] on a table]]
{| class="wikitable"
|-
| cell || {{tpl}}
|}
== History ==
It was built in 1999<!-- hidden --> by [http://example.org engineers] and <small>friends</small>&nbsp;too.
* first point
# second point
=== Details ===
More text [[Category:Devices]][[de:Kante]].
== References ==
{{reflist}}
* A reference line
== External links ==
* [http://example.org Official site]
"""


def test_strip_markup_keeps_prose_only() -> None:
    text = strip_markup(WIKITEXT)
    assert text.splitlines()[0] == "Edge is a small computing device used at the edge."
    for junk in ("{{", "}}", "[[", "<ref", "'''", "File:", "wikitable", "hidden", "Category", "Kante", "=="):
        assert junk not in text, junk
    assert "History" in text.splitlines() and "Details" in text.splitlines()
    assert "It was built in 1999 by engineers and friends too." in text
    assert "first point" in text.splitlines() and "second point" in text.splitlines()
    assert "A reference line" not in text and "Official site" not in text  # dropped sections


def test_real_articles_split_by_title_without_overlap() -> None:
    calib = items("wikipedia", "calib")
    evaluation = items("wikipedia", "eval")
    assert len(calib) > 60 and len(evaluation) > 20
    assert 0.15 < len(evaluation) / (len(calib) + len(evaluation)) < 0.35
    assert not {i.name for i in calib} & {i.name for i in evaluation}
    assert all(split_of(i.name) == "eval" for i in evaluation)
    anarchism = next(i for i in calib + evaluation if i.name == "Anarchism")
    assert anarchism.raw.startswith("Anarchism is a political philosophy")
    clean = [i for i in calib + evaluation if "{{" not in i.raw and "<ref" not in i.raw and "'''" not in i.raw]
    assert len(clean) >= 0.95 * (len(calib) + len(evaluation))
    assert [i.name for i in items("wikipedia", "eval", 3)] == [i.name for i in evaluation[:3]]


def test_token_stream_concatenates_articles() -> None:
    from transformers import AutoTokenizer

    from edgekit.models.smollm2 import checkpoint_dir

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir())
    stream = token_stream(tokenizer, "eval", max_tokens=5000, separator_id=0)
    assert stream.dtype.name == "int64" and stream.shape == (5000,)
    first = items("wikipedia", "eval", 1)[0].raw
    first_ids = tokenizer(first, add_special_tokens=False).input_ids
    assert stream[: min(len(first_ids), 100)].tolist() == first_ids[:100]
    if len(first_ids) < 5000:
        assert stream[len(first_ids)] == 0


def test_unknown_split_is_a_user_error() -> None:
    with pytest.raises(EdgekitError, match="unknown split"):
        items("wikipedia", "train")
