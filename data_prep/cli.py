"""ham-prep-data: Long Data Collections (or any jsonl / jsonl.zst / parquet) -> Megatron
IndexedDatasets (+ blend file, stats, optional webdataset shards).

Exit codes: 0 success, 2 bad arguments / manifest / settings, 3 bad input data under
--on-error fail (message names file and line), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .sources import DEFAULT_MAX_RECORD_BYTES

EPILOG = """\
examples:
  # the embedded sample corpus with its own tokenizer (seconds, offline)
  ham-prep-data --manifest sample --out runs/data/sample

  # the real dataset (local copy at a pinned revision), Llama-2 32k vocabulary
  ham-prep-data --manifest long-data-collections --data-root /data/Long-Data-Collections \\
      --tokenizer meta-llama/Llama-2-7b-hf --out /data/ldc-llama2 --workers 32

  # estimate what a 50B-token budget needs at the manifest's blend, without writing datasets
  ham-prep-data --manifest long-data-collections --data-root /data/Long-Data-Collections \\
      --tokenizer meta-llama/Llama-2-7b-hf --dry-run --budget 50B

  # ad-hoc inputs: NAME[:WEIGHT]=GLOB[,GLOB] or plain paths/globs
  ham-prep-data --input 'web:0.7=crawl/*.jsonl.zst' --input 'books:0.3=books/*.parquet' \\
      --tokenizer ./my-tokenizer --out runs/data/mix

  # also write packed 16k-token sequences as webdataset shards for 4 nodes x 8 GPUs x 2 loader workers
  ham-prep-data --manifest sample --out runs/data/sample --wds-out runs/data/sample-wds \\
      --wds-seq-len 16384 --wds-shard-multiple 64

outputs (in --out): <component>.bin/.idx (Megatron IndexedDataset, one per component),
blend.json (list of {prefix, weight}), stats.json (documents, tokens, length histogram,
problems with file:line), .work/state.json (per-file progress; a re-run skips finished files).
See docs/data.md.
"""


def _parse_budget(s: str) -> int:
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    s = s.strip().upper()
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 50B, 200M or 1e9, got {s!r}") from None


def _parse_bytes(s: str) -> int:
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9,
             "GB": 1e9, "B": 1}
    t = s.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u) and t[: -len(u)]:
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 16MiB, 1048576 or 2G, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ham-prep-data", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Tokenize Long Data Collections (or jsonl / jsonl.zst / parquet files) into one "
                    "Megatron IndexedDataset per component, with a blend file and statistics.")
    src = p.add_argument_group("input")
    src.add_argument("--manifest", help="built-in manifest name (sample, long-data-collections) or a YAML path")
    src.add_argument("--data-root", help="directory the manifest's relative file paths are resolved against "
                     "(default: the manifest's data_root, else its directory)")
    src.add_argument("--input", action="append", default=[], metavar="[NAME[:WEIGHT]=]GLOB",
                     help="ad-hoc input instead of/in addition to a manifest; repeatable")
    src.add_argument("--text-field", default="text", help="field tokenized for --input files (default: text)")
    src.add_argument("--revision", help="dataset revision the local copy was downloaded at (overrides the manifest)")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--tokenizer", help="Hugging Face tokenizer name or local directory "
                    "(default: the manifest's tokenizer; the sample's for --manifest sample)")
    tk.add_argument("--eod-id", type=int, help="EOD id appended to every document (default: the EOS token)")
    tk.add_argument("--prepend-bos", action="store_true", help="also prepend the BOS token to every document")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output directory (required unless --dry-run)")
    out.add_argument("--overwrite", action="store_true", help="rebuild components whose settings changed")
    out.add_argument("--keep-parts", action="store_true", help="keep the per-file parts in <out>/.work")
    run = p.add_argument_group("processing")
    run.add_argument("--workers", type=int, default=1,
                     help="tokenizer processes (one core each; output is identical for any value)")
    run.add_argument("--batch-bytes", type=_parse_bytes, default=1 << 20,
                     help="decompressed bytes of whole lines per work item (default 1 MiB; part of "
                          "the resumable state, keep it fixed across re-runs)")
    run.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                     help="malformed JSON, missing field, invalid UTF-8, truncated zstd, a record longer "
                          "than --max-record-bytes, an input that cannot be read (directory, dangling "
                          "link, no permission): fail (default, exit 3 naming file:line) or skip and "
                          "count. Empty documents are always skipped and counted; a component left "
                          "with no document fails under 'fail' and is left out of the blend under 'skip'.")
    run.add_argument("--max-record-bytes", type=_parse_bytes, default=DEFAULT_MAX_RECORD_BYTES,
                     help="longest record (jsonl line / parquet text, decompressed bytes) that is tokenized; "
                          "a longer one is a bad record (record_too_large, file:line). The tokenizer needs "
                          "up to ~225 bytes of memory per input byte, so the default (8 MiB) keeps a worker's "
                          "peak at about 2 GB whatever the input holds (zstd bombs and lines without a "
                          "newline included). Part of the resumable settings")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    dry = p.add_argument_group("dry run")
    dry.add_argument("--dry-run", action="store_true",
                     help="estimate tokens/documents/disk per component from a sample of each file; write nothing "
                          "but the estimate JSON")
    dry.add_argument("--budget", type=_parse_budget, help="token budget to plan for, e.g. 50B")
    dry.add_argument("--sample-bytes", type=_parse_bytes, default=16 << 20,
                     help="compressed bytes read from the start of each file for --dry-run (default 16 MiB)")
    dry.add_argument("--dry-run-out", help="where to write the estimate JSON (default: <out>/dry_run.json if "
                     "--out is given)")
    w = p.add_argument_group("webdataset export (after the IndexedDatasets are built)")
    w.add_argument("--wds-out", help="directory for packed-sequence tar shards (+ index.json)")
    w.add_argument("--wds-seq-len", type=int, default=16384, help="sequence length; samples hold seq_len+1 tokens")
    w.add_argument("--wds-shard-multiple", type=int, default=1,
                   help="shard count is a multiple of this (nodes x GPUs per node x loader workers)")
    w.add_argument("--wds-samples-per-shard", type=int, default=2048, help="target samples per shard")
    w.add_argument("--wds-sequences", type=int, help="total sequences (default: one epoch of the most "
                   "constrained component at the blend weights)")
    w.add_argument("--seed", type=int, default=1234, help="seed of the webdataset blend order")
    return p


def _setup_logging(level: str) -> None:
    import warnings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s ham-prep-data: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("data_prep").setLevel(getattr(logging, level))
    # other libraries (megatron-core logs every index it opens) stay at WARNING: readable output
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")


def main(argv=None) -> int:
    from .sources import DataError

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    log = logging.getLogger("data_prep")
    try:
        return _main(args, log)
    except KeyboardInterrupt:
        log.error("interrupted; finished files are kept, re-run the same command to resume")
        return 130
    except ValueError as e:
        log.error("%s", e)
        return 2
    except DataError as e:
        log.error("bad input: %s", e)
        return 3


def _main(args, log) -> int:
    from . import pipeline
    from .manifest import load_manifest, manifest_from_inputs
    from .tokenizer import SAMPLE_TOKENIZER, load_tokenizer

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.batch_bytes < 1024:
        raise ValueError(f"--batch-bytes must be >= 1024, got {args.batch_bytes}")
    if args.max_record_bytes < 1024:
        raise ValueError(f"--max-record-bytes must be >= 1024, got {args.max_record_bytes}")
    if args.out and os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    if not args.manifest and not args.input:
        raise ValueError("give --manifest NAME|PATH or at least one --input (see --help)")
    if not args.dry_run and not args.out:
        raise ValueError("--out is required (unless --dry-run)")
    if args.manifest:
        manifest = load_manifest(args.manifest, args.data_root)
        if args.input:
            extra = manifest_from_inputs(args.input, args.text_field)
            names = {c.name for c in manifest.components}
            clash = [c.name for c in extra.components if c.name in names]
            if clash:
                raise ValueError(f"--input component names {clash} clash with the manifest's")
            manifest.components += extra.components
    else:
        manifest = manifest_from_inputs(args.input, args.text_field)
    if args.revision:
        manifest.revision = args.revision
    if manifest.repo_id and not manifest.revision:
        log.warning("manifest %s has no pinned revision; record the revision your copy was downloaded at "
                    "with --revision (see docs/data.md)", manifest.path)
    tok_name = args.tokenizer or manifest.default_tokenizer or SAMPLE_TOKENIZER
    tok = load_tokenizer(tok_name, eod=args.eod_id, prepend_bos=args.prepend_bos)
    log.info("tokenizer %s: vocab %d, EOD id %d, %s tokens; %d component(s): %s", tok_name, tok.vocab_size, tok.eod,
             tok.dtype, len([c for c in manifest.components if c.files]),
             ", ".join(f"{c.name}({len(c.files)} file{'s' * (len(c.files) != 1)})" for c in manifest.components if c.files))

    if args.dry_run:
        from .dry_run import estimate
        res = estimate(manifest, tok, args.sample_bytes, args.budget, workers=args.workers,
                       batch_bytes=args.batch_bytes, seq_len=args.wds_seq_len if args.wds_out else None,
                       progress=not args.no_progress, max_record_bytes=args.max_record_bytes)
        dest = args.dry_run_out or (os.path.join(args.out, "dry_run.json") if args.out else None)
        if dest:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            pipeline._atomic_write_json(dest, res)
            log.info("estimate written to %s", dest)
        return 0

    opts = pipeline.Options(out=args.out, workers=args.workers, on_error=args.on_error,
                            batch_bytes=args.batch_bytes, progress=not args.no_progress,
                            overwrite=args.overwrite, keep_parts=args.keep_parts,
                            max_record_bytes=args.max_record_bytes)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    stats = pipeline.run(manifest, tok, opts)
    tot = stats["total"]
    log.info("done in %.1fs: %d documents, %d tokens (%d documents >= 16384 tokens); %s, %s",
             time.perf_counter() - t0, tot["documents"], tot["tokens"], tot["documents_at_least"]["16384"],
             os.path.join(args.out, "blend.json"), os.path.join(args.out, "stats.json"))
    if tot["problems"]:
        log.info("problems (skipped): %s", json.dumps(tot["problems"]))
    if args.wds_out:
        from .webdataset_io import export_webdataset
        export_webdataset(os.path.join(args.out, "blend.json"), args.wds_out, seq_len=args.wds_seq_len,
                          shard_multiple=args.wds_shard_multiple, samples_per_shard=args.wds_samples_per_shard,
                          num_sequences=args.wds_sequences, seed=args.seed, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
