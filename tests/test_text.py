"""Title and label normalisation (pipeline/io/text.py): the cut before cleaning, and its bound."""
from __future__ import annotations

import pytest

from cmaclip.config import CONFIG_DIR, load_config
from cmaclip.transforms import max_title_chars
from pipeline.io import text
from pipeline.io.text import MAX_TITLE_CHARS, NotText, clean, normalize_title
from pipeline.synthetic import MESSY_TITLE

MEBIBYTE_TITLE = "Acme  Red\tStriped Dress\x00 " + "very long words " * (1 << 16)


def test_a_megabyte_title_is_cut_before_it_is_cleaned(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(text, "clean", lambda value: seen.append(len(value)) or clean(value))
    title = normalize_title(MEBIBYTE_TITLE)
    assert len(MEBIBYTE_TITLE) > 1 << 20 and seen == [MAX_TITLE_CHARS]
    assert title == clean(MEBIBYTE_TITLE[:MAX_TITLE_CHARS]) and title.startswith("Acme Red Striped Dress very")
    assert normalize_title(MEBIBYTE_TITLE.encode("utf-8")) == title  # binary columns alike


def test_shorter_titles_are_only_cleaned() -> None:
    assert normalize_title(MESSY_TITLE) == clean(MESSY_TITLE)
    at_limit = "x" * MAX_TITLE_CHARS
    assert normalize_title(at_limit) == at_limit
    assert normalize_title(None) is None


def test_bytes_past_the_cut_are_still_checked() -> None:
    # The whole cell is decoded first: a binary title is UTF-8 or not, wherever its bad byte lies.
    with pytest.raises(NotText):
        normalize_title(b"x" * (2 * MAX_TITLE_CHARS) + b"\xff")


def test_the_cut_leaves_every_model_its_whole_context() -> None:
    # What a tokenizer can read, with a 4x margin for the whitespace and controls that cleaning removes.
    for path in sorted(CONFIG_DIR.glob("*.json")):
        context = load_config(path).clip.context_length
        assert 4 * max_title_chars(context) <= MAX_TITLE_CHARS, path.name
    assert 4 * max_title_chars(77) <= MAX_TITLE_CHARS  # CLIP's own context, whatever the shipped configs
