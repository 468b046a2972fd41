"""The training loop: resume after interruption, best checkpoint, early stopping, accumulation, callbacks,
the stage chain, evaluation, DDP under gloo, and overfitting a small batch."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmaclip.checkpoint import load_checkpoint
from cmaclip.config import STAGES
from cmaclip.evaluate import Predictions, evaluate, predict
from cmaclip.train import Callback, PrintCallback, read_stage_result, stage_table, train_stage, train_stages
from tiny_training import (TASKS, collate, loader, one_thread, padded_validation, run_ranks, samples,  # noqa: F401
                           tiny_config, tiny_model)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class Recorder(Callback):
    def __init__(self, stop_after_epoch=None):
        self.events, self.stop_after_epoch = [], stop_after_epoch

    def on_stage_start(self, stage, info):
        self.events.append(("start", stage, info["start_epoch"]))

    def on_step(self, stage, step, metrics):
        assert np.isfinite(metrics["loss"]) and "grad_norm" in metrics
        self.events.append(("step", stage, step))

    def on_epoch_end(self, stage, epoch, metrics):
        self.events.append(("epoch", stage, epoch))
        if epoch == self.stop_after_epoch:
            raise KeyboardInterrupt  # a preemption, after the epoch's checkpoint was written

    def on_stage_end(self, stage, result):
        self.events.append(("end", stage, result.epochs_run))


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, cache, shuffle", [("end_to_end", None, True), ("warmup", "memory", False)])
def test_stage_killed_after_epoch_k_and_restarted_matches_uninterrupted_run(tmp_path, stage, cache, shuffle):
    cfg = tiny_config(batch_size=32, micro_batch_size=16, patience=0)   # 2 micro-batches per step
    cfg.cma.dropout = 0.1                                               # RNG state matters
    cfg.train.stages[stage].epochs = 3
    train, val = loader(samples(cfg, 64, 1), 16, shuffle), collate(samples(cfg, 16, 2), range(16))

    model = tiny_model(cfg)
    full = train_stage(model, stage, cfg, train, [val], tmp_path / "a", cache=cache)
    uninterrupted = state(model)

    recorder = Recorder(stop_after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        train_stage(tiny_model(cfg), stage, cfg, train, [val], tmp_path / "b", cache=cache, callbacks=[recorder])
    assert read_stage_result(tmp_path / "b") is None                   # not finished
    torch.manual_seed(1234)                                             # a new process: other RNG state
    restarted = Recorder()
    model = tiny_model(cfg)
    result = train_stage(model, stage, cfg, train, [val], tmp_path / "b", cache=cache, callbacks=[restarted])

    assert restarted.events[0] == ("start", stage, 2)                  # continued after epoch 1
    assert [e for e in restarted.events if e[0] == "epoch"] == [("epoch", stage, 2)]
    assert_same_weights(state(model), uninterrupted)
    assert_same_weights(load_file(tmp_path / "a/best/model.safetensors"),
                        load_file(tmp_path / "b/best/model.safetensors"))
    # Timings differ, and so do cache counters: the restarted run refills its cache.
    same = lambda h: {k: v for k, v in h.items()  # noqa: E731
                      if not k.startswith("cache/") and k.split("/")[-1] not in ("seconds", "samples_per_s")}
    assert [same(h) for h in result.history] == [same(h) for h in full.history]
    assert result.epochs_run == 3 and result.best_epoch == full.best_epoch


def test_finished_stage_returns_stored_result_and_other_config_is_refused(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16)
    cfg.train.stages["tuning"].epochs = 2
    train, val = loader(samples(cfg, 32, 1), 16), [collate(samples(cfg, 16, 2), range(16))]
    first = train_stage(tiny_model(cfg), "tuning", cfg, train, val, tmp_path)
    again = Recorder()
    second = train_stage(tiny_model(cfg), "tuning", cfg, train, val, tmp_path, callbacks=[again])
    assert again.events == [] and second.history == first.history and second.best_metrics == first.best_metrics
    other = tiny_config(batch_size=16, micro_batch_size=16, seed=7)
    other.train.stages["tuning"].epochs = 2
    with pytest.raises(ValueError, match="another config"):
        train_stage(tiny_model(cfg), "tuning", other, train, val, tmp_path)
    restarted = train_stage(tiny_model(cfg), "tuning", other, train, val, tmp_path, resume=False)
    assert restarted.epochs_run == 2


def test_best_checkpoint_is_the_best_validation_epoch_with_calibrated_thresholds(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16, patience=0)
    cfg.train.stages["warmup"].epochs = 3
    train, val = loader(samples(cfg, 32, 1), 16), [collate(samples(cfg, 24, 2), range(24))]
    result = train_stage(tiny_model(cfg), "warmup", cfg, train, val, tmp_path, labels={
        "color": ["red", "green", "blue"], "pattern": ["plain", "striped"]})
    keys = [(h["val/mean_recall_at_precision"], h["val/mean_accuracy"], -h["val/loss"]) for h in result.history]
    assert result.best_epoch == max(range(3), key=lambda e: (keys[e], -e))   # first of equals wins
    model, ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt.extra["stage"] == "warmup" and ckpt.extra["epoch"] == result.best_epoch
    assert ckpt.labels["color"] == ["red", "green", "blue"]
    assert set(ckpt.thresholds) == set(TASKS)
    assert all(ckpt.thresholds[t] == result.best_metrics[f"{t}/threshold"] for t in TASKS)
    # The saved weights reproduce the recorded validation metrics.
    metrics, _ = evaluate(model, val, cfg.train.target_precision)
    assert metrics["mean_accuracy"] == result.best_metrics["mean_accuracy"]
    assert metrics["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-5)


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16, patience=2)
    cfg.train.stages["warmup"].epochs = 10
    data = samples(cfg, 16, 2)
    data["labels"] = {t: torch.full_like(y, -1) for t, y in data["labels"].items()}  # metrics cannot improve
    result = train_stage(tiny_model(cfg), "warmup", cfg, loader(samples(cfg, 32, 1), 16),
                         [collate(data, range(16))], tmp_path)
    assert result.epochs_run == 3 and result.best_epoch == 0 and result.stopped_early
    assert [h["improved"] for h in result.history] == [True, False, False]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    runs = []
    for micro in (8, 32):
        cfg = tiny_config(batch_size=32, micro_batch_size=micro, patience=0)
        cfg.train.stages["end_to_end"].epochs = 2
        recorder = Recorder()
        recorder.on_step = lambda stage, step, metrics, r=recorder: r.events.append(("step", step, metrics))
        model = tiny_model(cfg)
        start = state(model)
        train_stage(model, "end_to_end", cfg, loader(samples(cfg, 32, 1), micro),
                    [collate(samples(cfg, 8, 2), range(8))], tmp_path / str(micro), callbacks=[recorder])
        runs.append((start, state(model), [e[2] for e in recorder.events if e[0] == "step"]))
    (start, accumulated, steps4), (_, big, steps1) = runs
    assert len(steps4) == len(steps1) == 2                     # one optimizer step per 32 samples
    # First step, same weights and data: loss and gradient of 4 accumulated micro-batches = one batch of 32.
    assert steps4[0]["loss"] == pytest.approx(steps1[0]["loss"], rel=1e-6)
    assert steps4[0]["grad_norm"] == pytest.approx(steps1[0]["grad_norm"], rel=1e-4)
    # After Adam (which turns near-zero gradient noise into lr-sized steps) the weights still agree
    # closely relative to how far training moved them.
    flat = lambda sd: torch.cat([v.flatten().float() for v in sd.values()])  # noqa: E731
    moved, apart = (flat(big) - flat(start)).norm(), (flat(accumulated) - flat(big)).norm()
    assert apart < 0.02 * moved


def test_train_stages_chains_best_checkpoints_and_skips_finished_stages(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16)
    for s in STAGES:
        cfg.train.stages[s].epochs = 1
    train, val = loader(samples(cfg, 32, 1), 16), [collate(samples(cfg, 16, 2), range(16))]
    start = tiny_model(cfg)
    clip_start = {k: v.clone() for k, v in start.towers.state_dict().items()}
    recorder, lines = Recorder(), []
    results = train_stages(cfg, start, train, val, tmp_path, callbacks=[recorder, PrintCallback(lines.append)])
    assert list(results) == ["warmup", "end_to_end", "tuning"] and len(lines) == 3   # align is off by default
    assert [e[:2] for e in recorder.events if e[0] in ("start", "end")] == [
        ("start", "warmup"), ("end", "warmup"), ("start", "end_to_end"), ("end", "end_to_end"),
        ("start", "tuning"), ("end", "tuning")]
    best = {s: load_checkpoint(r.best_checkpoint)[0] for s, r in results.items()}
    assert_same_weights(best["warmup"].towers.state_dict(), clip_start)              # CLIP frozen
    assert_same_weights(best["tuning"].towers.state_dict(), best["end_to_end"].towers.state_dict())
    assert_same_weights(best["tuning"].sequence_attention.state_dict(),
                        best["end_to_end"].sequence_attention.state_dict())
    assert "mean_accuracy" in stage_table(results).splitlines()[0]
    again = Recorder()
    rerun = train_stages(cfg, lambda: pytest.fail("a finished chain builds no model"), train, val, tmp_path,
                         callbacks=[again])
    assert again.events == [] and {s: r.history for s, r in rerun.items()} == {
        s: r.history for s, r in results.items()}


def test_tiny_model_overfits_32_samples_two_tasks(tmp_path):
    cfg = tiny_config(batch_size=32, micro_batch_size=32, patience=0)
    stage = cfg.train.stages["end_to_end"]
    stage.epochs, stage.lr_clip, stage.lr_sequence, stage.lr_modality, stage.lr_head = 2, 1e-3, 1e-3, 1e-3, 1e-3
    batch = collate(samples(cfg, 32, 3), range(32))     # random labels: only memorising fits them
    result = train_stage(tiny_model(cfg), "end_to_end", cfg, lambda epoch: [batch] * 8, [batch], tmp_path)
    assert result.best_metrics["color/accuracy"] == 1.0 and result.best_metrics["pattern/accuracy"] == 1.0
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"] / 2


def test_bf16_training_is_finite(tmp_path):
    cfg = tiny_config(batch_size=16, micro_batch_size=16, precision="bf16")
    cfg.train.stages["end_to_end"].epochs = 1
    result = train_stage(tiny_model(cfg), "end_to_end", cfg, loader(samples(cfg, 32, 1), 16),
                         [collate(samples(cfg, 16, 2), range(16))], tmp_path)
    assert np.isfinite(result.history[0]["train/loss"]) and np.isfinite(result.best_metrics["loss"])


def test_predict_and_evaluate():
    cfg = tiny_config()
    model = tiny_model(cfg)
    data = samples(cfg, 20, 4)
    data["labels"]["pattern"][:5] = -1
    batches = [collate(data, range(i, min(i + 8, 20))) for i in range(0, 20, 8)]
    model.train()
    model.heads.eval()
    metrics, preds = evaluate(model, batches, 0.9)
    assert model.training and not model.heads.training                     # modes restored
    assert len(preds) == 20 and preds.product_id == data["ids"]
    assert preds.probs["color"].shape == (20, 3) and preds.labels["pattern"].shape == (20,)
    np.testing.assert_allclose(preds.probs["pattern"].sum(1), 1.0, rtol=1e-5)
    assert metrics["pattern/n"] == 15 and metrics["color/n"] == 20 and metrics["n"] == 20
    for key in ("mean_accuracy", "mean_recall_at_precision", "mean_macro_f1", "loss", "color/threshold",
                "color/image_weight", "pattern/macro_f1"):
        assert key in metrics
    assert 0 < metrics["color/image_weight"] < 1
    with torch.no_grad():
        direct = torch.softmax(model.eval()(batches[0]["images"], batches[0]["text"]).logits["color"], -1)
    np.testing.assert_allclose(preds.probs["color"][:8], direct.numpy(), rtol=1e-5, atol=1e-6)
    unlabeled = predict(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches])
    assert unlabeled.labels == {} and len(unlabeled) == 20
    both = Predictions.concat([preds, preds.take(np.arange(3))]).unique()
    assert both.product_id == preds.product_id
    np.testing.assert_array_equal(both.probs["color"], preds.probs["color"])


# ---------------------------------------------------------------------------------------------------------
# DDP: two CPU processes over gloo, as torchrun would start them.

def _ddp_worker(rank, world, out_dir):
    cfg = tiny_config(batch_size=32, micro_batch_size=8, patience=0)   # 8 x 2 ranks x 2 accumulated
    cfg.cma.dropout = 0.1
    cfg.train.stages["warmup"].epochs = 2
    cfg.train.stages["end_to_end"].epochs = 1
    shard = lambda batches: batches[rank::world]  # noqa: E731  the sampler's job, here by hand
    train = loader(samples(cfg, 64, 1), 8)
    val = padded_validation(cfg)
    model = tiny_model(cfg)
    results = {}
    for stage in ("warmup", "end_to_end"):
        results[stage] = train_stage(model, stage, cfg, lambda e: shard(train(e)), shard(val),
                                     f"{out_dir}/{stage}", cache="memory" if stage == "warmup" else None)
    return {"state": model.state_dict(), "n": results["warmup"].best_metrics["n"],
            "samples": results["warmup"].history[0]["train/samples"]}


@pytest.mark.slow
def test_ddp_under_gloo_keeps_ranks_identical_and_only_rank_0_writes(tmp_path):
    r0, r1 = run_ranks(_ddp_worker, tmp_path)
    assert_same_weights(r0["state"], r1["state"])
    assert r0["n"] == 24                    # validation over both ranks' shards, sampler padding dropped
    assert r0["samples"] == 64              # training samples counted over both ranks
    assert (tmp_path / "warmup/best/model.safetensors").exists()
    meta = json.loads((tmp_path / "end_to_end/last/state.json").read_text())
    assert meta["world_size"] == 2 and meta["finished"]
    assert not (tmp_path / "warmup/cache-rank0").exists()
