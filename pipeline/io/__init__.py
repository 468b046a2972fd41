"""Reading and writing, for every stage: any fsspec URI (atomic commits, bounded reads, a local cache), a
catalog's files, the images and text of untrusted rows, the one Parquet writer, the DuckDB queries."""
