"""Each contract is defined once (pipeline.contracts, pipeline.manifests) and everything else agrees with it:
the files scoring and ingest write, the pyfunc's signature and output, the tables in docs/contracts.md; the
JSON documents read back as their records, and a malformed one is an error naming its file and field."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import contracts, synthetic
from pipeline.ingest.dataset import MANIFEST, QUARANTINE, dataset_files, ingest, read_manifest
from pipeline.manifests import DatasetManifest, ManifestError, RunManifest, ShardMarker
from pipeline.scoring import distributor, finalize, planner, publish
from pipeline.scoring.predictor import Predictor
from pipeline.tracking import pyfunc

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = {"color": list(synthetic.COLORS), "pattern": list(synthetic.PATTERNS), "style": list(synthetic.STYLES)}


@pytest.fixture(scope="module")
def scored(checkpoint, tmp_path_factory) -> dict:
    """A finalized scoring run over good and bad rows, in two shards."""
    root = tmp_path_factory.mktemp("scored")
    catalog = str(root / "catalog.parquet")
    synthetic.make_catalog(24, catalog, seed=4, with_bad_rows=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = distributor.score(catalog, checkpoint, str(root / "out"), rows_per_shard=20, batch_size=16, workers=0,
                                    progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"catalog": catalog, "out": str(root / "out"), "summary": summary}


@pytest.fixture(scope="module")
def ingested(bad_catalog, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    ingest(bad_catalog, list(TASKS), str(out), min_class_count=1)
    return out


def _only(out: str, pattern: str) -> Path:
    found = sorted(Path(out).glob(pattern))
    assert found, pattern
    return found[0]


# --- predictions ----------------------------------------------------------------------------------------

def test_the_predictions_file_is_the_contracts_schema(scored):
    file = _only(scored["out"], "predictions/**/shard-00000.parquet")
    assert pq.read_schema(file).remove_metadata() == contracts.prediction_schema(list(TASKS))
    names = [c.name for c in contracts.prediction_columns(["color"], explain=True)]
    assert names[:3] == ["product_id", "content_hash", "color"]
    assert names[-4:] == ["model_name", "model_version", "run_id", "scored_at"]
    assert {"color_title_contribution", "color_image_contribution"} <= set(names)


def test_the_predictor_and_the_pyfunc_answer_in_the_contracts_columns(checkpoint, scored):
    predictor = Predictor.from_checkpoint(checkpoint, precision="fp32")
    assert predictor.columns() == contracts.task_columns(list(TASKS))
    frame = pq.read_table(scored["catalog"]).to_pandas()
    predictions, quarantine = predictor.predict_frame(frame)
    assert list(predictions.columns) == ["product_id", *predictor.output_columns]
    assert list(quarantine.columns) == contracts.QUARANTINE_COLUMNS and len(quarantine) > 0
    out = pyfunc.predict_rows(predictor, frame[list(pyfunc.INPUT_COLUMNS)], run_id="r1")
    outputs = pyfunc.signature(list(TASKS)).outputs
    assert list(out.columns) == outputs.input_names()
    assert outputs.input_names() == [c.name for c in contracts.prediction_columns(list(TASKS))] + ["quarantine_reason"]
    required = [spec.name for spec in outputs.inputs if spec.required]
    assert required == [c.name for c in contracts.LINEAGE] and out[required].notna().all().all()


def test_the_mlflow_signature_types_are_the_contracts(checkpoint):
    specs = {spec.name: spec.type.name for spec in pyfunc.signature(["color"]).outputs.inputs}
    for column in contracts.prediction_columns(["color"]):
        assert specs[column.name] == pyfunc.MLFLOW_TYPES[column.type], column.name


def test_the_docs_tables_are_the_contracts():
    page = (REPO_ROOT / "docs" / "contracts.md").read_text()
    for name, table in contracts.docs_tables().items():
        assert table in page, f"docs/contracts.md: the {name} table differs; paste `python -m pipeline.contracts`"


# --- quarantine -----------------------------------------------------------------------------------------

def test_both_stages_write_the_one_quarantine_schema(scored, ingested):
    scoring_file = _only(scored["out"], "quarantine/**/*.parquet")
    assert pq.read_schema(scoring_file).remove_metadata() == contracts.QUARANTINE_SCHEMA
    assert set(pq.read_table(scoring_file).column("stage").to_pylist()) == {"score"}
    ingest_file = ingested / QUARANTINE
    assert pq.read_schema(ingest_file) == contracts.QUARANTINE_SCHEMA
    assert set(pq.read_table(ingest_file).column("stage").to_pylist()) == {"ingest"}


# --- the JSON documents -------------------------------------------------------------------------------

def test_written_documents_are_exactly_their_records(scored, ingested):
    marker = _only(scored["out"], "_markers/**/shard-00000.json")
    manifest = Path(scored["summary"]["manifest"])
    dataset = ingested / MANIFEST
    for record, path in ((ShardMarker, marker), (RunManifest, manifest), (DatasetManifest, dataset)):
        on_disk = json.loads(path.read_text())
        assert record.read(str(path)).to_dict() == on_disk  # every key is a field, every field is written


def _rewrite(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_a_malformed_done_marker_names_its_file_and_field(scored, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored["out"], out)
    marker = _only(str(out), "_markers/**/shard-00001.json")
    _rewrite(marker, lambda d: d.pop("predicted"))
    plan = planner.plan_shards(scored["catalog"], rows_per_shard=20)
    (out / "_manifests" / f"run={scored['summary']['run_id']}.json").unlink()
    with pytest.raises(ManifestError, match=rf"{marker}: field 'predicted' is missing") as failed:
        finalize.finalize(plan, str(out), scored["summary"]["run_id"])
    assert failed.value.source == str(marker) and failed.value.field == "predicted"
    _rewrite(marker, lambda d: d.update(predicted=10, timings={**d["timings"], "total_s": "fast"}))
    with pytest.raises(ManifestError, match=r"field 'timings.total_s' is a string, expected a number"):
        finalize.finalize(plan, str(out), scored["summary"]["run_id"])


def test_a_malformed_run_or_dataset_manifest_names_its_file_and_field(scored, ingested, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored["out"], out)
    manifest = _only(str(out), "_manifests/*.json")
    _rewrite(manifest, lambda d: d.update(predictions="not a list"))
    with pytest.raises(ManifestError, match=rf"{manifest}: field 'predictions' is a string, expected a list"):
        publish.publish(str(out))
    dataset = tmp_path / "dataset"
    shutil.copytree(ingested, dataset)
    _rewrite(dataset / MANIFEST, lambda d: d["files"]["dataset"]["train"][0].pop("rows"))
    with pytest.raises(ManifestError, match=r"manifest.json: field 'files.dataset.train\[0\].rows' is missing"):
        dataset_files(str(dataset), "train")
    (dataset / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: is not JSON"):
        read_manifest(str(dataset))


def test_a_marker_from_before_the_later_fields_still_reads(scored):
    doc = json.loads(_only(scored["out"], "_markers/**/shard-00000.json").read_text())
    for added in ("explain", "model_source", "precision", "quarantine", "scored", "carried"):
        doc.pop(added)
    marker = ShardMarker.from_dict(doc)
    assert (marker.explain, marker.model_source, marker.precision, marker.quarantine) == (False, "", None, None)
    assert (marker.scored, marker.carried) == (None, 0)  # before carrying over: every prediction was scored


# --- imports --------------------------------------------------------------------------------------------

def test_the_contracts_and_stage_names_load_without_torch():
    probe = ("import sys, cmaclip, cmaclip.config, pipeline.contracts, pipeline.manifests, "
             "pipeline.orchestration.airflow_tasks; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'mlflow')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    from pipeline.orchestration import airflow_tasks
    from cmaclip import config
    assert airflow_tasks.STAGES is config.STAGES and airflow_tasks.ALIGN is config.ALIGN  # not a copy
