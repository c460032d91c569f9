"""What a served teacher costs per position: bytes on the wire and the rows and positions per second one vLLM server
answers, at several top-k, plain JSON and gzip (serve_teacher.sh's middleware).

    bash scripts/serve_teacher.sh MODEL --port 8000 &                 # wait until it prints that it is ready
    python bench/served_teacher_bench.py --url http://127.0.0.1:8000 --vocab 151665 --rows 64 --length 1024

Rows are random ids below --vocab (the student's real vocabulary), --rows of --length tokens, sent --workers at a
time; the client's JSON parsing runs in the same threads, so the rates are what a trainer would see.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from served_teacher import ServedTeacher, check_model_served  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="served model name (default: the server's only model)")
    parser.add_argument("--vocab", type=int, required=True, help="ids are drawn below this")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 64, 256])
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    random.seed(0)
    rows = [[random.randrange(args.vocab) for _ in range(args.length)] for _ in range(args.rows)]
    print(f"{args.rows} rows of {args.length} tokens, {args.workers} requests in flight, {args.url}")
    print("| k | answer | bytes per position | rows/s | positions/s |")
    print("|---|---|---|---|---|")
    for k in args.k:
        for compress in (False, True):
            teacher = ServedTeacher(args.url, model=args.model, top_k=k, compress=compress, max_workers=args.workers)
            check_model_served(teacher)
            teacher.top_k_rows(rows[:1])  # warm the connection and the server
            teacher.wire_bytes = teacher.positions = 0
            start = time.perf_counter()
            teacher.top_k_rows(rows)
            seconds = time.perf_counter() - start
            stats = teacher.stats()
            print(f"| {k} | {'gzip' if compress else 'JSON'} | {stats['wire_bytes_per_position']:.0f} | "
                  f"{args.rows / seconds:.1f} | {stats['positions'] / seconds:.0f} |", flush=True)
            teacher.close()


if __name__ == "__main__":
    main()
