"""ham-eval: evaluate a megatron-ham checkpoint or HF export (docs/evaluation.md).

Public API (stable; the recall generators also write training documents):
    recall:       TASKS, DEFAULTS, TokenSpace, RecallExample, TextHaystack, generate, min_length
    recall_suite: RecallPlan, run_recall
    model_io:     describe, load, ModelInfo, EvalModel, Forward
    heldout:      heldout;  perplexity: perplexity, document_positions
    routing:      RoutingRecorder, routing_trace;  calibrate: calibrate, threshold_for_fraction
    report:       SCHEMA, write_json, format_table;  cli: main (the `ham-eval` console script)
Nothing here imports megatron-core at import time: the recall generators work without it.
"""
from .errors import EvalError
from .recall import DEFAULTS, TASKS, RecallExample, TextHaystack, TokenSpace, generate, min_length

__all__ = ["EvalError", "TASKS", "DEFAULTS", "TokenSpace", "RecallExample", "TextHaystack", "generate",
           "min_length"]
