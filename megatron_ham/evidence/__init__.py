"""The recall-evidence grid (issue 16): does a HAM trained here recall what the paper says?

    python -m megatron_ham.evidence --out runs/evidence --budget-s 520      # the whole grid
    python -m megatron_ham.evidence.report --grid runs/evidence/grid.json   # docs from its JSON

Modules (one concept each):
  grid.py       the runner: the data (data_prep.recall_mixture), one ham-train process per
                (configuration, seed) run, several at once, a wall-clock budget, resumable
  run_eval.py   ham-eval on a run's checkpoints: held-out recall over training, the final model
                at 1k-8k, perplexity on held-out documents, routing, other KV fractions
  collect.py    every run's metrics.jsonl and ham-eval reports -> one grid.json
  report.py     grid.json -> docs/results/*.json, docs/*.png, docs/results.md
Everything goes through the real path: an IndexedDataset, ham-train with recipes/evidence/,
dist_checkpointing checkpoints, ham-eval.
"""
