"""Throughput of ham-prep-data against a plain single-process reference, in one run.

reference: what Megatron's tools/preprocess_data.py does per document -- read the jsonl.zst
line by line, json.loads, encode ONE document with the Hugging Face tokenizer
(``tokenizer(text).input_ids``), append EOD, ``IndexedDatasetBuilder.add_document``.
ham-prep-data: the pipeline of data_prep (blocks of lines, ``encode_batch_fast``, numpy
buffers) with 1 worker (inline, one process) and 2 workers (process pool + reader).

Prints tokens/s (wall) and tokens per CPU-second (user+sys of the process and its children;
less sensitive to other load on a shared machine) and the ratios ham(1)/reference and
ham(2)/ham(1). Each configuration runs ``--repeat`` times; the fastest run counts.

    python tools/bench_prep.py                      # the embedded sample corpus (~1.3M tokens)
    python tools/bench_prep.py --inputs 'data/*.jsonl.zst' --tokenizer meta-llama/Llama-2-7b-hf
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process everywhere: "per core" numbers
os.environ.setdefault("RAYON_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def reference(files, tokenizer_path, out_prefix):
    """Plain per-document pipeline; returns tokens written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    eod = tok.eos_token_id
    dtype = np.uint16 if len(tok) < 65500 else np.int32
    builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
    n = 0
    for path in files:
        with open(path, "rb") as fh:
            stream = zstandard.ZstdDecompressor().stream_reader(fh) if path.endswith(".zst") else fh
            for line in io.TextIOWrapper(stream, encoding="utf-8"):
                text = json.loads(line)["text"]
                ids = tok(text, add_special_tokens=False).input_ids + [eod]
                builder.add_document(torch.IntTensor(ids), [len(ids)])
                n += len(ids)
    builder.finalize(out_prefix + ".idx")
    return n


def ham(files, tokenizer_path, out_dir, workers, batch_bytes):
    from data_prep import pipeline
    from data_prep.manifest import Component, Manifest
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    comp = Component(name="bench", patterns=list(files), files=list(files), required_fields=["text"])
    m = Manifest(name="bench", path=None, components=[comp], data_root="/")
    st = pipeline.run(m, tok, pipeline.Options(out=out_dir, workers=workers, batch_bytes=batch_bytes,
                                               progress=False))
    return st["total"]["tokens"]


def measure(fn, repeat):
    best = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), _cpu()
        n = fn()
        wall, cpu = time.perf_counter() - w0, _cpu() - c0
        if best is None or wall < best[1]:
            best = (n, wall, cpu)
    return best


def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", default=os.path.join(here, "data_prep", "sample", "*", "*.jsonl.zst"),
                   help="glob of jsonl / jsonl.zst files with a 'text' field (default: the sample corpus)")
    p.add_argument("--tokenizer", default=os.path.join(here, "data_prep", "sample", "tokenizer"))
    p.add_argument("--batch-bytes", type=int, default=256 << 10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--copies", type=int, default=3,
                   help="read the input files this many times (more work per run: less start-up noise)")
    args = p.parse_args(argv)
    files = sorted(glob.glob(args.inputs))
    if not files:
        raise SystemExit(f"--inputs {args.inputs!r}: no files")
    files = files * args.copies
    import logging
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_prep_")
    try:
        size = sum(os.path.getsize(f) for f in files)
        print(f"inputs: {len(files)} files ({args.copies} copies), {size / 2**20:.2f} MiB compressed; tokenizer {args.tokenizer}")
        print(f"machine: {platform.node()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at start")
        ref = measure(lambda: reference(files, args.tokenizer, os.path.join(tmp, "ref")), args.repeat)

        def run_ham(w):
            def f():
                d = os.path.join(tmp, f"ham{w}")
                shutil.rmtree(d, ignore_errors=True)
                return ham(files, args.tokenizer, d, w, args.batch_bytes)
            return f
        h1 = measure(run_ham(1), args.repeat)
        h2 = measure(run_ham(2), args.repeat)
        same = open(os.path.join(tmp, "ham1", "bench.bin"), "rb").read() == \
            open(os.path.join(tmp, "ham2", "bench.bin"), "rb").read()
        ref_bin = np.fromfile(os.path.join(tmp, "ref.bin"), dtype=np.uint16 if h1[0] else np.int32)
        ham_bin = np.fromfile(os.path.join(tmp, "ham1", "bench.bin"), dtype=ref_bin.dtype)
        print(f"{'config':<30}{'tokens':>10}{'wall s':>9}{'tok/s':>11}{'cpu s':>8}{'tok/cpu-s':>11}")
        for name, (n, wall, cpu) in (("reference (1 process)", ref), ("ham-prep-data --workers 1", h1),
                                     ("ham-prep-data --workers 2", h2)):
            print(f"{name:<30}{n:>10}{wall:>9.2f}{n / wall:>11.0f}{cpu:>8.2f}{n / cpu:>11.0f}")
        print(f"ratio ham(1 worker) / reference, tok/s:      {ref[1] / h1[1]:.2f}x  (per cpu-second: "
              f"{(h1[0] / h1[2]) / (ref[0] / ref[2]):.2f}x)")
        print(f"ratio ham(2 workers) / ham(1 worker), tok/s: {h1[1] / h2[1]:.2f}x")
        print(f"outputs: 1 vs 2 workers identical: {same}; reference tokens == ham tokens: "
              f"{np.array_equal(ref_bin, ham_bin)}")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
