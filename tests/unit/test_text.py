"""What an agent printed, made storable (kjob.model.text.storable)."""

from __future__ import annotations

import pytest

from kjob.model.text import storable, text_problem


@pytest.mark.parametrize(("raw", "kept"), [
    ("plain", "plain"),
    ("a\x00b\x00", "a\ufffdb\ufffd"),
    ("lone \ud800 and \udfff", "lone \ufffd and \ufffd"),
    ("é 😀 \ufffd", "é 😀 \ufffd"),  # real characters, astral ones too, stay
])
def test_nul_and_lone_surrogates_become_the_replacement_character(raw, kept):
    assert storable(raw) == kept
    assert text_problem(storable(raw)) is None
