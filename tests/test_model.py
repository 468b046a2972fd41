"""The CMA-CLIP model against the paper (section 3.2) and against open_clip itself."""
import dataclasses
import random

import pytest
import torch

import cmaclip
from cmaclip.config import VARIANTS, load_config, with_variant
from cmaclip.losses import multitask_loss
from cmaclip.model import ModalityAttention
from cmaclip.transforms import (CHARS_PER_TOKEN, image_batch_transform, image_transform, max_title_chars,
                                padding_mask, tokenizer, trim_tokens)

TASKS = {"color": 5, "pattern": 3}
TITLES = ["red striped summer dress", "blue", "", "a very long title " * 3 + "with many words"]


@pytest.fixture(scope="module")
def config():
    return load_config("tiny").with_tasks(TASKS)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return cmaclip.create_model(config).eval()


@pytest.fixture(scope="module")
def batch(config):
    torch.manual_seed(1)
    full = tokenizer(config)(TITLES)
    return torch.randn(len(TITLES), 3, 32, 32), full


def test_shapes(model, batch, config):
    images, full = batch
    text = trim_tokens(full)
    tokens = model.encode_tokens(images, text)
    patches = (32 // 8) ** 2
    assert tokens.image.shape == (4, 1 + patches, 64)
    assert tokens.text.shape == (4, text.shape[1], 64)
    out = model(images, text)
    for task, n in TASKS.items():
        assert out.logits[task].shape == (4, n)
        assert out.image_weight[task].shape == (4,)


def test_pooled_tokens_equal_open_clip(model, batch):
    images, full = batch
    clip = model.towers.clip
    with torch.no_grad():
        image_tokens = model.towers.encode_image_tokens(images)
        text_tokens, _ = model.towers.encode_text_tokens(full)
        eot = full.argmax(-1)
        torch.testing.assert_close(image_tokens[:, 0], clip.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text_tokens[torch.arange(4), eot], clip.encode_text(full), atol=1e-5, rtol=1e-5)


def test_trimming_is_exact_for_every_non_pad_token(model, batch):
    images, full = batch
    trimmed = trim_tokens(full)
    assert trimmed.shape[1] < full.shape[1]
    with torch.no_grad():
        short, short_pad = model.towers.encode_text_tokens(trimmed)
        long, long_pad = model.towers.encode_text_tokens(full)
    keep = ~short_pad
    torch.testing.assert_close(short[keep], long[:, : trimmed.shape[1]][keep], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        a, b = model(images, trimmed), model(images, full)
    for task in TASKS:
        torch.testing.assert_close(a.logits[task], b.logits[task], atol=1e-5, rtol=1e-5)


def test_sequence_first_layout_gives_the_same_numbers(config, batch):
    torch.manual_seed(0)
    model = cmaclip.create_model(config).eval()
    images, text = batch[0], trim_tokens(batch[1])
    with torch.no_grad():
        reference = model(images, text)
        model.sequence_attention.set_sequence_first(True)
        assert not model.sequence_attention.encoder.layers[0].self_attn.batch_first
        other = model(images, text)
    for task in TASKS:
        torch.testing.assert_close(other.logits[task], reference.logits[task], atol=1e-5, rtol=1e-5)


def test_padding_mask_from_positions_not_ids():
    # Token id 0 is "!", a real token: a title of "!" must not be masked as padding.
    text = torch.tensor([[49406, 0, 0, 49407, 0, 0]])
    assert padding_mask(text).tolist() == [[False, False, False, False, True, True]]


@pytest.mark.parametrize("size", [32, 224])
def test_batch_image_transform_is_bit_identical_to_open_clip(size):
    from PIL import Image
    config = load_config("tiny")
    config = dataclasses.replace(config, clip=dataclasses.replace(
        config.clip, overrides={**config.clip.overrides, "vision_cfg": {"image_size": size}}))
    generator = torch.Generator().manual_seed(0)
    shapes = [(60, 80), (80, 60), (size, size), (7, 300), (513, 97)]  # portrait, landscape, exact, extreme
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
              for w, h in shapes] + [Image.new("RGB", (40, 40), "red"), Image.new("L", (50, 30), 128)]
    per_image = image_transform(config)
    batched = image_batch_transform(config)(images)
    assert batched.dtype == torch.float32 and batched.shape == (len(images), 3, size, size)
    assert torch.equal(batched, torch.stack([per_image(im) for im in images]))
    assert image_batch_transform(config)([]).shape == (0, 3, size, size)


# --- titles: cut to what the context can hold ------------------------------------------------------------

@pytest.fixture(scope="module", params=["tiny", "paper-vit-b-32"])  # contexts of 32 and 77 tokens
def clip_config(request):
    return load_config(request.param)


def open_clip_tokenizer(config):
    """open_clip's tokenizer as is: every title encoded in full, then truncated to the context."""
    from open_clip import get_tokenizer
    return get_tokenizer(config.clip.model_name, context_length=config.clip.context_length)


def test_chars_per_token_bounds_the_vocabulary():
    from open_clip.tokenizer import SimpleTokenizer
    bpe = SimpleTokenizer()
    # The byte encoder spells each byte as one character, so an entry's length is its length in bytes.
    longest = max(len(entry.removesuffix("</w>")) for entry, i in bpe.encoder.items()
                  if i not in (bpe.sot_token_id, bpe.eot_token_id))
    assert longest + 1 <= CHARS_PER_TOKEN  # + the one space dropped between two words


def whole_words() -> list[str]:
    """The vocabulary's one-token ASCII words: the most characters per token, the fewest tokens per title."""
    from open_clip.tokenizer import SimpleTokenizer
    return [e[:-4] for e in SimpleTokenizer().encoder if e.endswith("</w>") and e[:-4].isascii() and e[:-4].isalpha()]


def test_the_longest_title_that_fits_is_not_cut(clip_config):
    # The longest one-token word, as many times as the context holds: the longest title that fits.
    from open_clip.tokenizer import SimpleTokenizer
    bpe = SimpleTokenizer()
    count = clip_config.clip.context_length - 2  # start and end of text
    title = " ".join([max(whole_words(), key=len)] * count)
    assert len(bpe.encode(title)) == count and len(title) <= max_title_chars(clip_config.clip.context_length)
    ours = tokenizer(clip_config)([title])
    assert torch.equal(ours, open_clip_tokenizer(clip_config)([title]))
    assert ours[0, -1] == bpe.eot_token_id  # the whole title, then the end of text, in the last slot


def random_title(rng: random.Random, length: int, vocabulary: list[str], whole: float = 0.5) -> str:
    """Whole words of `vocabulary` (a share `whole` of the words; all of them, one space apart: as few tokens
    as a title can have), and words of every kind the tokenizer splits on: scripts, digits, punctuation,
    emoji, HTML references, long runs."""
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZéèüßç", "абвгдежзий", "漢字東京赤青",
                 "0123456789", "-&/.,'!()", "😀👗👩🏽\u200d💻", "&amp;"]
    words, total = [], 0
    while total < length:
        if rng.random() < whole:
            word = rng.choice(vocabulary)
        else:
            size = rng.choice([1, 2, 4, 8, 16]) if rng.random() < 0.97 else rng.randint(100, 400)
            word = "".join(rng.choices(rng.choice(alphabets), k=size))
        words.append(word + (" " if whole == 1 else rng.choice([" ", " ", "", "  "])))
        total += len(words[-1])
    return "".join(words)[:length]


def test_cutting_never_changes_the_tokens(clip_config):
    ours, theirs = tokenizer(clip_config), open_clip_tokenizer(clip_config)
    limit = max_title_chars(clip_config.clip.context_length)
    rng, vocabulary = random.Random(0), sorted(whole_words(), key=len)
    titles = [random_title(rng, rng.randint(limit // 8, 3 * limit), vocabulary[-rng.choice([100, 10_000]):],
                           rng.choice([0.5, 1.0])) for _ in range(40)]
    assert any(len(t) > limit for t in titles) and any(len(t) <= limit for t in titles)
    assert torch.equal(ours(titles), theirs(titles))


def test_a_megabyte_title_reads_as_its_first_characters(clip_config):
    title = random_title(random.Random(1), 1 << 20, whole_words())
    limit = max_title_chars(clip_config.clip.context_length)
    tokens = tokenizer(clip_config)([title])
    assert torch.equal(tokens, open_clip_tokenizer(clip_config)([title[:limit]]))
    assert torch.equal(tokens, open_clip_tokenizer(clip_config)([title[:2 * limit]]))  # the cut changed nothing


def test_keyless_attention_formula():
    torch.manual_seed(0)
    ma = ModalityAttention(8)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    c, lam = ma(image, text)
    e_i, e_t = image @ ma.w, text @ ma.w
    expected_lam = torch.exp(e_i) / (torch.exp(e_i) + torch.exp(e_t))
    torch.testing.assert_close(lam, expected_lam)
    torch.testing.assert_close(c, expected_lam[:, None] * image + (1 - expected_lam[:, None]) * text)
    assert ((lam > 0) & (lam < 1)).all()


def test_lambda_in_open_unit_interval(model, batch):
    images, full = batch
    with torch.no_grad():
        out = model(images, trim_tokens(full))
    for lam in out.image_weight.values():
        assert ((lam > 0) & (lam < 1)).all()


def test_masked_loss_ignores_missing_labels_per_task():
    torch.manual_seed(0)
    logits = {"color": torch.randn(4, 5), "pattern": torch.randn(4, 3)}
    labels = {"color": torch.tensor([0, -1, 2, -1]), "pattern": torch.tensor([-1, -1, -1, -1])}
    total, per_task = multitask_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits["color"][[0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(per_task["color"], expected)
    assert per_task["pattern"].item() == 0.0
    torch.testing.assert_close(total, expected)
    # Changing the logits of a masked sample changes nothing.
    logits["color"][1] += 100
    torch.testing.assert_close(multitask_loss(logits, labels)[0], expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs(variant, config, batch):
    images, full = batch
    torch.manual_seed(0)
    model = cmaclip.create_model(with_variant(config, variant)).eval()
    with torch.no_grad():
        out = model(images, trim_tokens(full))
    lam = out.image_weight["color"]
    assert out.logits["color"].shape == (4, 5)
    if variant == "image-only":
        assert (lam == 1).all()
    elif variant == "text-only":
        assert (lam == 0).all()
    elif variant in ("no-modality-attention", "no-attention"):
        assert (lam == 0.5).all()
    if variant == "no-attention":
        assert model.sequence_attention is None


def test_single_modality_variants_ignore_the_other_modality(config, batch):
    images, full = batch
    text = trim_tokens(full)
    for variant, change in (("image-only", "text"), ("text-only", "image")):
        torch.manual_seed(0)
        model = cmaclip.create_model(with_variant(config, variant)).eval()
        with torch.no_grad():
            a = model(images, text).logits["color"]
            b = model(images if change == "text" else torch.randn_like(images),
                      text.flip(0) if change == "text" else text).logits["color"]
        torch.testing.assert_close(a, b)


def test_parameter_groups_partition_trainable_parameters(model):
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    named = {id(p): n for n, p in model.named_parameters()}
    missing = [named[i] for i in set(named) - set(ids)]
    assert all("logit_" in n for n in missing), missing


def test_config_round_trip(config):
    again = cmaclip.CMACLIPConfig.from_dict(config.to_dict())
    assert again == config
    paper = load_config("paper-vit-b-32")
    assert (paper.cma.layers, paper.cma.width, paper.cma.heads) == (12, 512, 8)
    assert paper.train.batch_size == 1024 and paper.train.weight_decay == 1e-4
    assert paper.train.stages["end_to_end"].lr_clip == 1e-5
    assert paper.train.stages["tuning"].lr_sequence == 0 and paper.train.stages["warmup"].lr_clip == 0


def test_unknown_config_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("nope")


def test_open_clip_building_lines_go_to_debug(config, caplog):
    """open_clip logs on the root logger while it builds a model or a tokenizer ("No pretrained weights
    loaded" for the random start a config asks for): those lines belong in a debug log, not a task log."""
    from cmaclip.pretrained import OPEN_CLIP_DIR

    with caplog.at_level("DEBUG"):
        cmaclip.create_model(config, load_pretrained=False)
        tokenizer(config)
    assert [r.getMessage() for r in caplog.records if r.pathname.startswith(OPEN_CLIP_DIR)] == []
    moved = [r.getMessage() for r in caplog.records if r.name == "cmaclip.pretrained" and r.levelname == "DEBUG"]
    assert any("No pretrained weights loaded" in m for m in moved) and any("tokenizer" in m for m in moved)
