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


def _names_and_shapes(paths: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of safetensors files, read from their headers (no data)."""
    found = {}
    for path in paths:
        with safetensors.safe_open(path, framework="pt") as handle:
            found.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return found


class WeightSyncExtension:
    """Mixed into vLLM's worker class (so `self` is the worker). Its methods answer errors rather than raise them: an
    exception in a collective_rpc call stops vLLM's engine process, and the trainer reports the answer in one line."""

    def weight_sync_ready(self) -> dict:
        """The trainer's start-up probe: this extension is loaded."""
        return {"ready": True}

    def _served_checkpoint(self) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes of the checkpoint the server loaded at start (None when they cannot be read: not
        safetensors, or a loader other than the default one)."""
        if not hasattr(self, "_checkpoint_shapes"):
            try:
                from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

                model_config = self.vllm_config.model_config
                _, files, use_safetensors, _ = DefaultModelLoader(self.vllm_config.load_config)._prepare_weights(
                    model_config.model, None, model_config.revision, True, None)
                self._checkpoint_shapes = _names_and_shapes(files) if use_safetensors else None
            except Exception:  # noqa: BLE001 - a check we cannot run is skipped, never a crash of the server
                self._checkpoint_shapes = None
        return self._checkpoint_shapes

    def reload_from_file(self, path: str) -> dict:
        """Load every tensor of the safetensors file `path` (checkpoint names, as the student's named_parameters) into
        the served model in place, then answer the file's `step` metadata and its tensor count, so the trainer can
        check that this engine now holds exactly the weights it wrote for that step. A file whose tensor names or
        shapes differ from the served checkpoint's (another architecture) is refused before anything is loaded."""
        try:
            with safetensors.safe_open(path, framework="pt") as handle:
                step = (handle.metadata() or {}).get("step")
            sent, served = _names_and_shapes([path]), self._served_checkpoint()
            if served is not None:
                served = {name: shape for name, shape in served.items() if not name.endswith("rotary_emb.inv_freq")}
                if sent != served:
                    missing, extra = sorted(set(served) - set(sent)), sorted(set(sent) - set(served))
                    other = sorted(name for name in set(sent) & set(served) if sent[name] != served[name])
                    return {"error": f"the weights sent are not the served model's: missing {missing[:3]}, "
                                     f"unknown {extra[:3]}, other shapes {other[:3]}"}
            device = next(self.model_runner.get_model().parameters()).device
            tensors = load_file(path, device=str(device))
            with torch.no_grad():
                self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
            return {"step": step, "tensors": len(tensors)}
        except Exception as error:  # noqa: BLE001 - see the class docstring
            return {"error": f"{type(error).__name__}: {error}"}
