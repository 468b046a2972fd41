"""Ingest: a catalog in, a validated dataset out (deduplicated, split, vocabularies, manifest, quarantine)."""
