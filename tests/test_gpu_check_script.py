"""scripts/gpu_check.sh, the prepared GPU run, fails when one of its steps fails: run here with stand-ins for
nvidia-smi, python3 and accelerate on PATH, a failing precision step makes the script exit 1 naming that step, after
the other steps have still run; with every stand-in succeeding it exits 0."""

import os
import subprocess

import pytest
from conftest import ROOT

PYTHON3 = """#!/usr/bin/env bash
case "$1" in
    scripts/gpu_check.py) echo '{"check": "sgd_bf16_sdpa", "passed": false}'; exit "${FAKE_PRECISION_STATUS:-0}";;
    -) cat > /dev/null; echo '{}';;
    *) echo "ran python3 $*";;
esac
"""


@pytest.mark.parametrize("precision_status", [0, 1])
def test_gpu_check_exits_1_naming_a_failed_step(tmp_path, precision_status):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("python3", PYTHON3), ("nvidia-smi", "#!/usr/bin/env bash\necho 'name, memory.total'\n"),
                       ("accelerate", "#!/usr/bin/env bash\necho 'teacher on rank 0: holds 1 of 2 parameters'\n")):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
                   "FAKE_PRECISION_STATUS": str(precision_status)}
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                            env=environment, timeout=120)
    output = result.stdout + result.stderr
    assert "--- ZeRO-3, sharded teacher, 1 GPU" in output and "--- loss benchmark on CUDA" in output  # all steps ran
    if precision_status:
        assert result.returncode == 1, output
        assert "1 step(s) failed:\n  precision checks and bf16 runs (gpu_check.py)" in output
    else:
        assert result.returncode == 0 and "every step passed" in output, output
