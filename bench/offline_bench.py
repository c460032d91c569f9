"""Offline-capture record: bytes per position and reconstruction error of offline.TopKCodec.

    python bench/offline_bench.py            # k = 64, V = 151,936 (Qwen2), synthetic teacher distributions

For each family of synthetic logits (Gaussian with several scales, Zipf with several exponents, each token order
shuffled per row) at T = 1 and 2: the mean KL(exact top-k + tail || decoded record), and the encode and decode
speed. Real teachers are not reachable offline; these families span entropies from about 0.7 to 11 nats.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import topk_distribution  # noqa: E402
from offline import TopKCodec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    codec = TopKCodec(args.vocab, args.k)
    print(f"k = {args.k}, V = {args.vocab}: {codec.bits} bits, {codec.record_bytes} bytes per position "
          f"(float32 full distribution: {4 * args.vocab:,} bytes)\n")
    ranks = torch.arange(1, args.vocab + 1).float().log()
    families = {f"gaussian, scale {s:g}": lambda s=s: torch.randn(args.rows, args.vocab) * s for s in (6, 10, 14)}
    families.update({f"zipf, exponent {a:g}": lambda a=a: torch.stack(
        [-a * ranks[torch.randperm(args.vocab)] + 0.3 * torch.randn(args.vocab) for _ in range(args.rows)])
        for a in (1.0, 1.5, 2.0, 2.5, 3.0)})
    print("| logits | T | entropy (nats) | top-k mass | mean KL | max KL |\n| --- | --- | --- | --- | --- | --- |")
    worst, encode_s, decode_s, positions = 0.0, 0.0, 0.0, 0
    for name, make in families.items():
        logits = make()
        for temperature in (1.0, 2.0):
            log_probs_full = torch.log_softmax(logits / temperature, -1)
            entropy = -(log_probs_full.exp() * log_probs_full).sum(-1).mean().item()
            ids, log_probs, tail = topk_distribution(logits, args.k, temperature)
            start = time.perf_counter()
            records = codec.encode(ids.numpy(), log_probs.numpy())
            middle = time.perf_counter()
            got_ids, got_log_probs, got_tail = codec.decode(records)
            encode_s, decode_s = encode_s + middle - start, decode_s + time.perf_counter() - middle
            positions += len(records)
            order = np.argsort(ids.numpy(), 1)
            assert (np.take_along_axis(ids.numpy(), order, 1) == got_ids).all()
            p = np.concatenate([np.take_along_axis(log_probs.double().exp().numpy(), order, 1),
                                tail.double().numpy()[:, None]], 1)
            q = np.concatenate([np.exp(got_log_probs.astype(np.float64)), got_tail[:, None].astype(np.float64)], 1)
            kl = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0).sum(1)
            worst = max(worst, kl.mean())
            print(f"| {name} | {temperature:g} | {entropy:.2f} | {p[:, :-1].sum(1).mean():.3f} | {kl.mean():.2e} | "
                  f"{kl.max():.2e} |")
    print(f"\nworst mean KL {worst:.2e} (target 1e-3): {'PASS' if worst < 1e-3 else 'FAIL'}; "
          f"{codec.record_bytes} bytes (target 160): {'PASS' if codec.record_bytes <= 160 else 'FAIL'}")
    print(f"encode {positions / encode_s:,.0f} positions/s, decode {positions / decode_s:,.0f} positions/s (numpy, 1 process)")


if __name__ == "__main__":
    main()
