"""The student head's gradient summed over the chunked loss's chunks: float32 accumulator (what losses.py holds)
against accumulating in bf16 (the parameter dtype of a bf16 student), each against a float64 sum.

    python bench/head_gradient_precision.py VOCAB HIDDEN CHUNK_TOKENS CHUNKS     # e.g. 16384 256 256 64

Each chunk's logit gradient is a cross-entropy one (softmax minus one-hot) of random logits, stored in bf16 like the
kernel's logit buffer under bf16 autocast, and the hidden states are bf16. Prints the relative error (norm) of each sum.
"""

import sys

import torch


def main(vocab: int, hidden: int, chunk: int, chunks: int) -> None:
    torch.manual_seed(0)
    exact = torch.zeros(vocab, hidden, dtype=torch.float64)
    in_float32 = torch.zeros(vocab, hidden, dtype=torch.float32)
    in_bf16 = torch.zeros(vocab, hidden, dtype=torch.bfloat16)
    for _ in range(chunks):
        states = torch.randn(chunk, hidden).to(torch.bfloat16)
        gradient = torch.softmax(torch.randn(chunk, vocab) * 3, -1)
        gradient[torch.arange(chunk), torch.randint(0, vocab, (chunk,))] -= 1
        gradient = gradient.to(torch.bfloat16)
        exact += gradient.double().t() @ states.double()
        in_float32 += gradient.float().t() @ states.float()  # losses._addmm_fp32's CPU path
        in_bf16 += gradient.t() @ states  # a bf16 product added to a bf16 sum
    for name, value in (("float32 accumulator", in_float32), ("bf16 accumulator", in_bf16),
                        ("float32 sum rounded to bf16 once", in_float32.to(torch.bfloat16))):
        error = ((value.double() - exact).norm() / exact.norm()).item()
        print(f"V={vocab} H={hidden}, {chunks} chunks of {chunk}: {name}: relative error {error:.2e}")


if __name__ == "__main__":
    main(*(int(value) for value in sys.argv[1:5]))
