"""Figure 2's maps are the model's own attention, and title words are found at the right token positions."""
import open_clip
import pytest
import torch

import cmaclip
from cmaclip.attention_maps import default_layer, phrase_token_positions, upsample, word_patch_attention
from cmaclip.config import load_config, with_variant
from cmaclip.transforms import tokenizer, trim_tokens

TITLES = ["Puma Men Black, T-shirt", "Women Navy Blue Kurta", "Nike Grey Shoes"]


@pytest.fixture(scope="module")
def bpe():
    return open_clip.get_tokenizer("ViT-B-32", context_length=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cmaclip.create_model(load_config("tiny").with_tasks({"color": 4})).eval()


def test_phrase_positions_point_at_the_words(bpe):
    ids = bpe(TITLES)
    for title, phrase in zip(TITLES, ["Black", "Navy Blue", "grey"]):
        positions = phrase_token_positions(bpe, title, phrase)
        row = ids[TITLES.index(title)]
        decoded = bpe.decode(row[positions].tolist()).strip().lower()
        assert decoded == phrase.lower()


def test_absent_phrase_has_no_positions(bpe):
    assert phrase_token_positions(bpe, "Nike Grey Shoes", "Black") == []
    assert phrase_token_positions(bpe, "Blackberry Shoes", "Black") == []


def test_map_is_the_models_attention_renormalised_over_patches(model, bpe):
    config = model.config
    torch.manual_seed(1)
    images = torch.randn(len(TITLES), 3, 32, 32)
    text = trim_tokens(tokenizer(config)(TITLES))
    positions = [phrase_token_positions(bpe, t, p) for t, p in zip(TITLES, ["Black", "Navy Blue", "Grey"])]
    layer = default_layer(model)
    maps = word_patch_attention(model, images, text, positions, layer)
    grid = model.towers.clip.visual.grid_size
    assert maps.shape == (len(TITLES), *grid)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(len(TITLES)))

    # The same numbers from nn.MultiheadAttention's own weights, restricted to the patches.
    with torch.no_grad():
        tokens = model.encode_tokens(images, text)
        seq = torch.cat([tokens.image, tokens.text], dim=1)
        pad = torch.cat([tokens.text_padding.new_zeros(tokens.image.shape[:2]), tokens.text_padding], dim=1)
        x = model.sequence_attention.proj_in(seq)
        for block in model.sequence_attention.encoder.layers[:layer]:
            x = block(x, src_key_padding_mask=pad)
        block = model.sequence_attention.encoder.layers[layer]
        h = block.norm1(x)
        _, weights = block.self_attn(h, h, h, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    n_image = tokens.image.shape[1]
    for b, pos in enumerate(positions):
        w = weights[b][:, [n_image + p for p in pos], 1:n_image]
        expected = (w / w.sum(dim=-1, keepdim=True)).mean(dim=(0, 1)).reshape(grid)
        torch.testing.assert_close(maps[b], expected, atol=1e-5, rtol=1e-4)

    # The inference layout (sequence-first, see SequenceAttention) draws the same maps.
    model.sequence_attention.set_sequence_first(True)
    try:
        torch.testing.assert_close(word_patch_attention(model, images, text, positions, layer), maps,
                                   atol=1e-5, rtol=1e-4)
    finally:
        model.sequence_attention.set_sequence_first(False)


def test_needs_sequence_attention_over_both_modalities():
    config = with_variant(load_config("tiny").with_tasks({"color": 4}), "no-attention")
    model = cmaclip.create_model(config).eval()
    with pytest.raises(ValueError):
        word_patch_attention(model, torch.randn(1, 3, 32, 32), trim_tokens(tokenizer(config)(["a"])), [[1]])


def test_upsample_rescales_each_map_to_unit_range():
    up = upsample(torch.rand(2, 4, 4), 16)
    assert up.shape == (2, 16, 16)
    assert torch.allclose(up.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(up.flatten(1).max(1).values, torch.ones(2))
