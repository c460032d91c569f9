"""The demo's hidden-state rows alone (examples/demo.py, steps 4-5), before and after the cross-tokenizer fixes:
the Llama student on the teacher's tokenizer and on tokenizer B, SFT and hidden-state KD at the current defaults and
at the previous ones (positions aligned, teacher_norm none), with the demo's held-out CE (tokenizer-B rows per
teacher-tokenizer token, as in the README table).

    python bench/demo_hidden_rows.py      # builds examples/.cache if missing (as examples/demo.py does)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]

import torch  # noqa: E402

import demo  # noqa: E402
import distil_hidden  # noqa: E402
import distil_logits  # noqa: E402

PREVIOUS = {"positions": "aligned", "teacher_norm": "none"}  # distil_hidden.py's behaviour before the fix


def main() -> None:
    torch.set_num_threads(1)
    paths = demo.build(False)
    setup = dict(teacher=paths["teacher"], data=paths["train"], eval_data=paths["eval"], rows=demo.demo["student_rows"],
                 epochs=demo.demo["student"]["epochs"], batch=32, learning_rate=7e-3)
    out = os.path.join(demo.OUTPUT, "hidden_rows")
    _, teacher_tokens = demo.heldout_nats(paths["teacher"], paths["eval"])
    results = {}
    for student, label in (("llama_init", "Llama student"), ("llama_b_init", "Llama student, tokenizer B")):
        runs = [("SFT", distil_logits, {"alpha": 0.0}),
                ("hidden-state KD, previous defaults", distil_hidden, {**demo.demo["hidden"], **PREVIOUS}),
                ("hidden-state KD, current defaults", distil_hidden, dict(demo.demo["hidden"]))]
        for name, script, distillation in runs:
            folder = os.path.join(out, f"{student}-{name.split(',')[-1].strip().replace(' ', '_')}")
            demo.timed(script.main)(demo.five_evaluations(demo.run_config(
                f"{label}, {name}", output_dir=folder, script=script, **distillation, **dict(setup, student=paths[student]))))
            total, count = demo.heldout_nats(folder, paths["eval"])
            results[f"{label}, {name}"] = total / (teacher_tokens if student == "llama_b_init" else count)
            print(f"RESULT {label}, {name}: {results[f'{label}, {name}']:.4f}", flush=True)
    print("\n| model | held-out CE (nats/token) |\n| --- | --- |")
    for name, value in results.items():
        print(f"| {name} | {value:.4f} |")


if __name__ == "__main__":
    main()
