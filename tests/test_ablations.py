"""The ablation list of the paper protocol is derived from the config (paper/ablations.py): one per
training-choice group turned on in a trained stage, plus align when it has epochs; and what each reuses."""
import dataclasses

import pytest

import cmaclip
from cmaclip.config import SCHEDULE_FIELDS, TRAINING_CHOICES, StageConfig
from paper.ablations import ablations, reused_stages, with_stages


def _config(**stages):
    config = cmaclip.load_config("tiny")
    for name, changes in stages.items():
        config = with_stages(config, {name: dataclasses.replace(config.train.stages[name], **changes)})
    return config


def test_every_stage_field_is_a_schedule_field_or_a_training_choice():
    grouped = [f for fields in TRAINING_CHOICES.values() for f in fields]
    assert len(grouped) == len(set(grouped))
    assert sorted(f.name for f in dataclasses.fields(StageConfig)) == sorted([*SCHEDULE_FIELDS, *grouped])


def test_the_configs_ablate_what_they_turn_on():
    assert ablations(cmaclip.load_config("tiny")) == []
    assert [a.group for a in ablations(cmaclip.load_config("paper-cpu-small"))] == ["title corruption",
                                                                                  "modality loss"]


def test_one_ablation_per_group_on_in_any_stage_and_align():
    config = _config(align={"epochs": 1}, warmup={"crop_scale": (0.8, 1.0), "flip": 0.5},
                     end_to_end={"modality_loss": 0.3, "drop_title": 0.1},
                     tuning={"remove_label_words": 0.5, "swap_title": 0.2, "modality_loss": 1.0})
    got = {a.group: a for a in ablations(config)}
    assert list(got) == ["title corruption", "image augmentation", "modality loss", "align stage"]
    titles = got["title corruption"]
    assert titles.removed == {"end_to_end": {"drop_title": 0.1},
                              "tuning": {"remove_label_words": 0.5, "swap_title": 0.2}}
    assert not any(titles.config.train.stages[s].corrupts_titles for s in ("end_to_end", "tuning"))
    assert titles.config.train.stages["end_to_end"].modality_loss == 0.3  # the other groups untouched
    assert titles.config.train.stages["warmup"] == config.train.stages["warmup"]
    assert reused_stages(config, titles.config) == ["align", "warmup"]
    assert got["modality loss"].stages == ["end_to_end", "tuning"]
    assert reused_stages(config, got["modality loss"].config) == ["align", "warmup"]
    assert reused_stages(config, got["image augmentation"].config) == ["align"]
    assert reused_stages(config, got["align stage"].config) == []
    assert got["align stage"].config.train.stages["align"].epochs == 0


def test_a_stage_without_epochs_has_nothing_to_ablate():
    config = _config(tuning={"epochs": 0, "modality_loss": 0.5})
    assert ablations(config) == []


@pytest.mark.parametrize("group", list(TRAINING_CHOICES))
def test_without_resets_only_its_group(group):
    on = StageConfig(drop_title=0.2, label_word_tasks=["color"], crop_scale=(0.5, 1.0), flip=0.5,
                     color_jitter=0.1, modality_loss=0.4, lr_head=3e-4)
    off = on.without(group)
    assert group not in off.choices_on() and set(off.choices_on()) == set(on.choices_on()) - {group}
    assert off.lr_head == on.lr_head


def test_ablations_flag():
    import argparse

    from paper.options import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([]), "x").ablations
    assert not options_from_args(parser.parse_args(["--no-ablations"]), "x").ablations


def test_report_says_when_there_is_nothing_to_ablate():
    from paper.report import ablation_table

    results = {"ablations": {"rows": [], "groups": list(TRAINING_CHOICES)}, "robustness": {}}
    assert "nothing to ablate" in ablation_table(results)
    assert ablation_table({"ablations": {"not_run": "--no-ablations"}}) == "Not run: --no-ablations."
