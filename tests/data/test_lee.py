"""The Lee news corpus: 300 real articles, every fifth one held out for evaluation."""

from __future__ import annotations

from edgekit.data import items
from edgekit.data.lee import lines


def test_fixed_split_of_the_real_corpus() -> None:
    calib = items("lee", "calib")
    evaluation = items("lee", "eval")
    assert (len(calib), len(evaluation)) == (240, 60)
    assert not {i.name for i in calib} & {i.name for i in evaluation}
    assert evaluation[0].name == "lee-004" and evaluation[0].raw == lines()[4]
    assert calib[0].raw.startswith("Hundreds of people have been forced to vacate their homes")
    assert all(len(i.raw) > 100 for i in calib + evaluation)
    assert len(items("lee", "eval", 7)) == 7
