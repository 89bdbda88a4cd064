"""The one place test tolerances live. Each is (atol, rtol) against a float64 reference."""
import torch

# Output rounding dominates: one or two ulps of the output dtype at unit scale, plus fp32 accumulation.
ELEMENTWISE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Attention adds the softmax and two reductions, with P rounded to the input dtype before P @ V on tensor cores.
ATTENTION = {
    torch.float32: (2e-3, 2e-3),  # Triton's fp32 dots may run as tf32 on the GPU
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2.5e-2, 2.5e-2),
}
# Logits of a whole (tiny) model, the rewritten graph against HF eager.
LOGITS = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype, msg: str = "") -> None:
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=msg or None,
                               equal_nan=False)
# A dot product: the output's rounding plus fp32 accumulation over K (small K in tests).
MATMUL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# A dot product per half, each rounded, then SiLU and the product, each rounded (cinfer::linear_silu_mul).
GATED_MATMUL = {
    torch.float32: (4e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3.2e-2, 3.2e-2),
}
