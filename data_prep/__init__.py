"""ham-prep-data: Long Data Collections (or jsonl / jsonl.zst / parquet) -> Megatron IndexedDatasets.

Modules: cli (entry point), manifest (YAML manifests, file resolution), sources (streaming
readers, per-block parse + tokenize worker), tokenizer (HF tokenizer loading, Megatron adapter),
pipeline (ordered multiprocess writing, resumable state, merge, stats, blend.json), dry_run
(--dry-run estimates), webdataset_io (packed-sequence shards + PackedSequenceDataset reader),
build_sample (rebuilds data_prep/sample). See docs/data.md.
"""
