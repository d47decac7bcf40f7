"""Human-readable training logs (stdout + TensorBoard) and the FLOPs / MFU accounting."""
from .metrics import PEAK_TFLOPS, model_flops_per_token, peak_flops
from .writer import MetricsWriter

__all__ = ["PEAK_TFLOPS", "model_flops_per_token", "peak_flops", "MetricsWriter"]
