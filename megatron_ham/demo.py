"""The README's main command (placeholder until the pipeline lands): run the HAM layer math on a sample."""
import torch

from megatron_ham.ops import gated_delta_rule


def main() -> None:
    torch.manual_seed(0)
    B, T, H, K, V = 1, 256, 4, 32, 32
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H) * 0.1
    beta = torch.rand(B, T, H)
    o, _, err = gated_delta_rule(q, k, v, g, beta, return_error=True)
    print(f"gated delta rule: o {tuple(o.shape)}, mean routing error {err.mean():.4f}")


if __name__ == "__main__":
    main()
