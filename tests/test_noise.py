"""Title noise for the robustness table: label-word removal (the training policy's, cmaclip.corruption),
whether a title names its label, and title swapping (paper.noise)."""
import numpy as np
import pytest

from cmaclip.corruption import names_label, remove_label_words
from paper.noise import swap_permutation, swap_titles


def test_removes_every_word_of_the_label_phrase_case_insensitively():
    assert remove_label_words("Men NAVY blue Slim Shirt", "Navy Blue") == "Men Slim Shirt"
    assert remove_label_words("Navy Blue", "Navy Blue") == ""


def test_whole_words_only():
    assert remove_label_words("Reddish Tank Top in red", "Red") == "Reddish Tank Top in"
    assert remove_label_words("Tanned Red-Brown Belt", "Tan") == "Tanned Red-Brown Belt"


def test_several_label_phrases_per_product():
    assert remove_label_words("Puma Men Black Casual Shoes", ["Black", "Casual Shoes", None]) == "Puma Men"


def test_regex_characters_in_labels_are_literal():
    assert remove_label_words("Lip Gloss (Pink) 2.5ml", "2.5ml") == "Lip Gloss (Pink)"
    assert remove_label_words("a+b plus ab", "a+b") == "plus ab"


def test_missing_titles_and_labels():
    assert [remove_label_words(t, lab) for t, lab in [(None, "Blue"), ("Blue Jeans", None), ("", "Blue")]] \
        == ["", "Blue Jeans", ""]


def test_names_label_matches_the_whole_phrase_only():
    titles = ["Nike Men Black T-shirt", "Blackish Watch", "Women Navy Kurta", None, "Blue"]
    labels = ["black", "Black", "Navy Blue", "Blue", None]
    assert names_label(titles, labels).tolist() == [True, False, False, False, False]


def test_removed_labels_are_no_longer_named():
    titles = ["Nike Men Black T-shirt", "Black Watch", "Women Navy Blue Kurta"]
    labels = ["Black", "Black", "Navy Blue"]
    assert names_label(titles, labels).tolist() == [True, True, True]
    assert not names_label([remove_label_words(t, lab) for t, lab in zip(titles, labels)], labels).any()


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_swap_is_a_derangement(n):
    donor = swap_permutation(n, seed=7)
    assert sorted(donor.tolist()) == list(range(n))
    assert not np.any(donor == np.arange(n))


def test_swap_is_reproducible_and_depends_on_the_seed():
    titles = [f"title {i}" for i in range(50)]
    assert swap_titles(titles, 1) == swap_titles(titles, 1)
    assert swap_titles(titles, 1) != swap_titles(titles, 2)
    assert sorted(swap_titles(titles, 1)) == sorted(titles)


def test_swap_needs_two_products():
    with pytest.raises(ValueError):
        swap_titles(["only one"], 0)
