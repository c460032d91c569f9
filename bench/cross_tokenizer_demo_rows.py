"""The demo's tokenizer-B rows for logit KD across tokenizers alone (examples/demo.py --full, step 4): the Llama
student on tokenizer B trained by SFT and by `distillation.cross_tokenizer` (uld, hybrid) with the settings demo.py
builds (300 rows, 20 epochs, batch 32, lr 7e-3, the script's distillation defaults, evaluated once at the end), and
the demo's held-out CE of each (nats on the same assistant text per teacher-tokenizer token, as in the README table).

    python bench/cross_tokenizer_demo_rows.py                        # SFT, uld, hybrid
    python bench/cross_tokenizer_demo_rows.py --methods hybrid --set cross_tokenizer_max_piece_tokens=1

Builds examples/.cache if missing (as examples/demo.py does).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]

import torch  # noqa: E402

import demo  # noqa: E402
import distil_logits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sft,uld,hybrid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a distillation key for the cross-tokenizer runs (value read as JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = demo.build(False)
    setup = dict(teacher=paths["teacher"], student=paths["llama_b_init"], data=paths["train"], eval_data=paths["eval"],
                 rows=demo.demo["student_rows"], epochs=demo.demo["student"]["epochs"], batch=32, learning_rate=7e-3)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    _, teacher_tokens = demo.heldout_nats(paths["teacher"], paths["eval"])
    for method in args.methods.split(","):
        settings = {"alpha": 0.0} if method == "sft" else {"cross_tokenizer": method, **overrides}
        folder = os.path.join(demo.OUTPUT, "cross_rows", method)
        config = demo.run_config(f"demo-llama-b-{method}", output_dir=folder, **settings, **setup)
        config["training"]["eval_strategy"] = "no"
        start = time.time()
        distil_logits.main(config)
        total, _ = demo.heldout_nats(folder, paths["eval"])
        print("RESULT " + json.dumps({"method": method, "settings": settings, "heldout_ce": total / teacher_tokens,
                                      "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
