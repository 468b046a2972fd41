"""Title noise for the robustness table: label-word removal and title swapping."""
import numpy as np
import pytest

from pipeline.noise import names_label, remove_label_words, swap_permutation, swap_titles


def test_removes_every_word_of_the_label_phrase_case_insensitively():
    out = remove_label_words(["Men NAVY blue Slim Shirt", "Navy Blue"], ["Navy Blue", "Navy Blue"])
    assert out == ["Men Slim Shirt", ""]


def test_whole_words_only():
    titles = ["Reddish Tank Top in red", "Tanned Red-Brown Belt"]
    assert remove_label_words(titles, ["Red", "Tan"]) == ["Reddish Tank Top in", "Tanned Red-Brown Belt"]


def test_several_label_phrases_per_product():
    titles = ["Puma Men Black Casual Shoes"]
    assert remove_label_words(titles, [["Black", "Casual Shoes", None]]) == ["Puma Men"]


def test_regex_characters_in_labels_are_literal():
    assert remove_label_words(["Lip Gloss (Pink) 2.5ml"], ["2.5ml"]) == ["Lip Gloss (Pink)"]
    assert remove_label_words(["a+b plus ab"], ["a+b"]) == ["plus ab"]


def test_missing_titles_and_labels():
    assert remove_label_words([None, "Blue Jeans", ""], ["Blue", None, "Blue"]) == ["", "Blue Jeans", ""]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        remove_label_words(["a", "b"], ["a"])


def test_removed_labels_are_no_longer_named():
    titles = ["Nike Men Black T-shirt", "Black Watch", "Women Navy Blue Kurta"]
    labels = ["Black", "Black", "Navy Blue"]
    assert names_label(titles, labels).tolist() == [True, True, True]
    assert not names_label(remove_label_words(titles, labels), labels).any()


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
