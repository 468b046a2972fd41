"""Batch pipeline around the CMA-CLIP model: storage, ingest, loaders, training, registry, scoring."""
