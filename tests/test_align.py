"""The optional `align` stage (catalog pre-training): retrieval recall, the contrastive loss over titled
pairs, what it trains, warm-up starting from it, resume, DDP, the config switch and the CLI end to end."""
import json

import pytest
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

import cmaclip
from cmaclip.align import MONITOR, contrastive_loss, has_title, retrieval_metrics, retrieval_recall
from cmaclip.checkpoint import load_checkpoint
from cmaclip.config import ALIGN, ALL_STAGES, STAGES, CMACLIPConfig
from cmaclip.stages import frozen_groups
from cmaclip.train import Callback, read_stage_result, train_stage, train_stages
from cmaclip.transforms import tokenizer
from tiny_training import (collate, loader, one_thread, padded_validation, run_ranks, samples,  # noqa: F401
                           tiny_config, tiny_model)

RECALLS = ["val/image_to_title_recall_at_1", "val/image_to_title_recall_at_5"]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def align_config(epochs=2, **train):
    cfg = tiny_config(**{"batch_size": 32, "micro_batch_size": 16, "patience": 0, **train})
    cfg.train.stages[ALIGN].epochs = epochs
    cfg.train.stages[ALIGN].lr_clip = 1e-3
    return cfg


def with_untitled(data, cfg, rows):
    """The same products, `rows` of them without a title (null titles are tokenized as "")."""
    empty = tokenizer(cfg)([""])[0]
    data["text"][rows] = empty
    return data


class StopAfter(Callback):
    def __init__(self, epoch=None):
        self.epoch, self.epochs = epoch, []

    def on_epoch_end(self, stage, epoch, metrics):
        self.epochs.append(epoch)
        if epoch == self.epoch:
            raise KeyboardInterrupt  # a preemption, after the epoch's checkpoint was written


# --- retrieval recall and the loss ------------------------------------------------------------------------

def test_retrieval_recall_on_hand_made_embeddings():
    eye = torch.eye(6)
    assert retrieval_recall(eye, eye) == {1: 1.0, 5: 1.0}                  # each image is its own title
    # Image i's own title is orthogonal to it (similarity 0) and title i+1 equals it: one title above, the
    # four others tie with the own one. Random tie-breaking: rank 1 + uniform{0..4}; P(rank < 5) = 4/5.
    assert retrieval_recall(eye, eye.roll(1, dims=0)) == {1: 0.0, 5: pytest.approx(0.8)}
    collapsed = torch.nn.functional.normalize(torch.ones(10, 4), dim=-1)    # every pair alike: chance
    assert retrieval_recall(collapsed, collapsed) == {1: pytest.approx(0.1), 5: pytest.approx(0.5)}
    # 2500 pairs -> 3 blocks of 834, 833, 833: chance is 1 / block size, per block.
    big = torch.nn.functional.normalize(torch.ones(2500, 4), dim=-1)
    assert retrieval_recall(big, big, ks=(1,))[1] == pytest.approx(3 / 2500)
    assert retrieval_recall(big[:7], big[:7], ks=(1,), pool=3)[1] == pytest.approx(3 / 7)  # blocks 3, 2, 2


def test_retrieval_metrics_count_each_product_once_in_id_order():
    image = torch.eye(4)
    title = torch.eye(4)[[0, 1, 3, 2]]        # the titles of c and d are swapped
    ids = ["c", "a", "d", "b"]
    metrics = retrieval_metrics(ids + ["a"], torch.cat([image, image[1:2]]), torch.cat([title, title[1:2]]), 10.0)
    assert metrics["n"] == 4 and metrics["logit_scale"] == 10.0
    assert metrics["image_to_title_recall_at_1"] == 0.5 and metrics["image_to_title_recall_at_5"] == 1.0
    order = [1, 3, 0, 2]                        # a, b, c, d
    assert metrics["loss"] == pytest.approx(float(ClipLoss()(image[order], title[order], torch.tensor(10.0))))


def test_contrastive_loss_is_clip_loss_over_the_titled_pairs():
    cfg = tiny_config()
    text = tokenizer(cfg)(["red shirt", "", "blue dress", "striped"])
    keep = has_title(text)
    assert keep.tolist() == [True, False, True, True]
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    title = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(5.0)
    assert torch.equal(contrastive_loss(image, title, scale, keep), ClipLoss()(image[keep], title[keep], scale))
    # No titled pair: a zero loss whose backward still reaches every input (DDP waits for every parameter).
    image.requires_grad_(True)
    scale.requires_grad_(True)
    loss = contrastive_loss(image, title, scale, torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(image.grad, torch.zeros_like(image)) and scale.grad == 0


# --- the config switch --------------------------------------------------------------------------------

def test_align_is_off_by_default_and_on_with_epochs():
    for name in ("tiny", "paper-cpu-small", "paper-vit-b-32"):
        assert cmaclip.load_config(name).train.stage_order() == STAGES == ("warmup", "end_to_end", "tuning")
    old = cmaclip.load_config("tiny").to_dict()
    del old["train"]["stages"][ALIGN]                      # a config written before align existed
    assert CMACLIPConfig.from_dict(old).train.stage_order() == STAGES
    d = cmaclip.load_config("tiny").to_dict()
    d["train"]["stages"][ALIGN] = {"epochs": 2}             # read over align's defaults: CMA parts frozen
    on = CMACLIPConfig.from_dict(d)
    assert on.train.stage_order() == ALL_STAGES
    assert frozen_groups(ALIGN, on) == {"sequence", "modality", "head"}
    on.train.stages[ALIGN].lr_head = 1e-3
    with pytest.raises(ValueError, match="freezes"):
        frozen_groups(ALIGN, on)


def test_align_refuses_title_corruption_that_unpairs_images_and_titles(tmp_path):
    cfg = align_config()
    cfg.train.stages[ALIGN].swap_title = 0.5
    data = samples(cfg, 16, 1)
    with pytest.raises(ValueError, match="swap_title"):
        train_stage(tiny_model(cfg), ALIGN, cfg, loader(data, 16), [collate(data, range(16))], tmp_path)


def test_a_pipeline_training_has_its_stages_in_order_and_ends_with_a_classifier():
    from pipeline.training.trainer import check_stages

    assert check_stages(("align", "warmup", "end_to_end", "tuning")) == list(ALL_STAGES)
    assert check_stages(["align", "tuning"]) == ["align", "tuning"]
    for bad in ([], ["align"], ["warmup", "align"], ["tuning", "warmup"], ["warmup", "warmup"], ["pretrain"]):
        with pytest.raises(ValueError, match="subsequence"):
            check_stages(bad)


# --- training ------------------------------------------------------------------------------------------

def test_align_trains_the_towers_on_titled_pairs_and_warmup_starts_from_them(tmp_path):
    cfg = align_config(epochs=2)
    cfg.train.stages["warmup"].epochs = 1
    train = loader(with_untitled(samples(cfg, 64, 1), cfg, [3, 10, 40]), 16, shuffle=True)
    val = [collate(with_untitled(samples(cfg, 24, 2), cfg, [0]), range(24))]
    start = tiny_model(cfg)
    before = state(start)
    results = train_stages(cfg, start, train, val, tmp_path, stages=[ALIGN, "warmup"])

    align = results[ALIGN]
    assert [h["train/samples"] for h in align.history] == [61, 61]       # the three untitled rows left out
    assert all(k in h for h in align.history for k in RECALLS) and align.best_metrics["n"] == 23
    aligned, ckpt = load_checkpoint(align.best_checkpoint)
    after = state(aligned)
    assert ckpt.extra["stage"] == ALIGN and ckpt.extra["monitor"] == MONITOR and ckpt.thresholds == {}
    # CLIP's towers and temperature moved; the CMA modules kept their initial weights.
    assert not same(before, after, "towers.clip.visual.") and not same(before, after, "towers.clip.transformer.")
    assert not same(before, after, "towers.clip.logit_scale")
    assert all(same(before, after, p) for p in ("sequence_attention.", "modality_attention.", "heads."))
    # Warm-up freezes CLIP: its towers are align's, bit for bit.
    warm = state(load_checkpoint(results["warmup"].best_checkpoint)[0])
    assert same(after, warm, "towers.") and not same(after, warm, "heads.")


def test_align_killed_after_epoch_k_and_restarted_matches_uninterrupted_run(tmp_path):
    cfg = align_config(epochs=3)
    train = loader(with_untitled(samples(cfg, 64, 1), cfg, [5]), 16, shuffle=True)  # shuffled: RNG state matters
    val = [collate(samples(cfg, 24, 2), range(24))]

    model = tiny_model(cfg)
    full = train_stage(model, ALIGN, cfg, train, val, tmp_path / "a")
    uninterrupted = state(model)

    with pytest.raises(KeyboardInterrupt):
        train_stage(tiny_model(cfg), ALIGN, cfg, train, val, tmp_path / "b", callbacks=[StopAfter(1)])
    assert read_stage_result(tmp_path / "b") is None
    torch.manual_seed(1234)                                             # a new process: other RNG state
    restarted, model = StopAfter(), tiny_model(cfg)
    result = train_stage(model, ALIGN, cfg, train, val, tmp_path / "b", callbacks=[restarted])

    assert restarted.epochs == [2]
    assert same(state(model), uninterrupted)
    best = lambda run: load_file(tmp_path / run / "best/model.safetensors")  # noqa: E731
    assert same(best("a"), best("b"))
    timing = ("train/seconds", "train/samples_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in result.history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in full.history]


# --- DDP: two CPU processes over gloo -------------------------------------------------------------------

def _ddp_align_worker(rank, world, out_dir):
    cfg = align_config(epochs=2, batch_size=32, micro_batch_size=16)  # one micro-batch per rank and step
    batches = loader(samples(cfg, 64, 1), 16)
    val = padded_validation(cfg)
    model = tiny_model(cfg)
    result = train_stage(model, ALIGN, cfg, lambda e: batches(e)[rank::world], val[rank::world], f"{out_dir}/ddp")
    return {"state": model.state_dict(), "metrics": result.best_metrics}


@pytest.mark.slow
def test_align_under_ddp_optimises_what_one_process_does_with_accumulation(tmp_path):
    r0, r1 = run_ranks(_ddp_align_worker, tmp_path)
    assert same(r0["state"], r1["state"])
    # One process, the same micro-batches accumulated two by two: the same objective, without any gather.
    cfg = align_config(epochs=2, batch_size=32, micro_batch_size=16)
    data = samples(cfg, 24, 2)
    model = tiny_model(cfg)
    single = train_stage(model, ALIGN, cfg, loader(samples(cfg, 64, 1), 16), [collate(data, range(24))],
                         tmp_path / "single")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert r0["metrics"]["n"] == 24                             # validation over both shards, padding dropped
    assert r0["metrics"][MONITOR] == pytest.approx(single.best_metrics[MONITOR])
    meta = json.loads((tmp_path / "ddp/last/state.json").read_text())
    assert meta["world_size"] == 2 and meta["finished"]


# --- the pipeline: CLI, MLflow, unlabelled rows ----------------------------------------------------------

@pytest.fixture
def partly_labelled_dataset(tmp_catalog, tmp_path):
    """The synthetic catalog with the labels of half its rows and the titles of 20 removed, ingested."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.ingest.dataset import ingest

    table = pq.read_table(tmp_catalog)
    n = table.num_rows
    for task in ("color", "pattern", "style"):
        kept = [v if i % 2 else None for i, v in enumerate(table.column(task).to_pylist())]
        table = table.set_column(table.schema.get_field_index(task), task, pa.array(kept, pa.string()))
    titles = [None if i % 20 == 0 else t for i, t in enumerate(table.column("title").to_pylist())]
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles, pa.string()))
    pq.write_table(table, tmp_path / "catalog.parquet")
    manifest = ingest(str(tmp_path / "catalog.parquet"), ["color", "pattern", "style"], str(tmp_path / "dataset"))
    assert manifest["counts"]["rows_kept"] == n
    return str(tmp_path / "dataset")


@pytest.mark.slow
def test_cli_trains_align_over_unlabelled_rows_then_warmup(partly_labelled_dataset, tmp_path, monkeypatch, capsys):
    from mlflow_support import mlflow_home
    from pipeline import cli
    from pipeline.ingest.dataset import dataset_files
    from pipeline.io import storage
    from pipeline.tracking import tracker

    train_rows = [t for f in dataset_files(partly_labelled_dataset, "train")
                  for t in storage.parquet_file(f["uri"]).read(columns=["title"]).column("title").to_pylist()]
    with mlflow_home(tmp_path / "home"):
        # No --stages: the config's, and the epochs override turns align on.
        code = cli.main(["train", "--data", partly_labelled_dataset, "--out", str(tmp_path / "run"), "--epochs",
                         "align=1,warmup=1,end_to_end=1,tuning=1", "--no-register", "--json", "--device", "cpu"])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["training"]["stages"] == list(ALL_STAGES) and set(result["stages"]) == set(ALL_STAGES)
        state_json = json.loads((tmp_path / "run/stages/align/last/state.json").read_text())
        # Every titled training row, labelled or not.
        assert state_json["state"]["history"][0]["train/samples"] == sum(1 for t in train_rows if t)
        assert MONITOR in result["stages"][ALIGN]
        c = tracker.client()
        runs = c.search_runs([c.get_run(result["run_id"]).info.experiment_id],
                             filter_string=f"tags.`{tracker.STAGE_TAG}` = '{ALIGN}'")
        assert len(runs) == 1 and {f"val/{MONITOR}", "val/image_to_title_recall_at_5"} <= set(runs[0].data.metrics)
