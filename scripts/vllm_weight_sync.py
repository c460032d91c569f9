"""vLLM worker extension that loads the student's new weights from a safetensors file (on_policy.engine: vllm).

The vLLM server that serves the student imports this module (serve_student.sh passes
`--worker-extension-cls vllm_weight_sync.WeightSyncExtension` and puts scripts/ on PYTHONPATH) and mixes the class
into its workers; the trainer calls `reload_from_file` through the server's `/collective_rpc` endpoint, which exists
only with `VLLM_SERVER_DEV_MODE=1`. It runs in vLLM's environment (.venv-vllm), never in the training one.

Why a file and vLLM's in-place reload: vLLM 0.32's weight-transfer backends (NCCL, CUDA IPC) need GPUs, and on the
CPU vLLM repacks every linear weight for oneDNN and drops the original tensor, so a plain `model.load_weights` has no
tensor to copy into. `Worker.reload_weights` restores the checkpoint layout layer by layer, loads, and packs again,
on the CPU and on GPUs alike.
"""

import safetensors
import torch
from safetensors.torch import load_file


class WeightSyncExtension:
    """Mixed into vLLM's worker class (so `self` is the worker)."""

    def weight_sync_ready(self) -> dict:
        """The trainer's start-up probe: this extension is loaded."""
        return {"ready": True}

    def reload_from_file(self, path: str) -> dict:
        """Load every tensor of the safetensors file `path` (checkpoint names, as the student's state_dict) into the
        served model in place, then answer the file's `step` metadata and its tensor count, so the trainer can check
        that this engine now holds exactly the weights it wrote for that step."""
        with safetensors.safe_open(path, framework="pt") as handle:
            step = (handle.metadata() or {}).get("step")
        device = next(self.model_runner.get_model().parameters()).device
        tensors = load_file(path, device=str(device))
        with torch.no_grad():
            self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return {"step": step, "tensors": len(tensors)}
