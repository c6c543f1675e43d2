"""Export an experiment's classifier for deployment: TorchScript (``.pt``) or ONNX (``.onnx``).

    info = run_export("exp/rav-probe", "model.onnx")      # None = the packaged default model

The exported graph holds the model *and* the training split's normalisation: its inputs are the
raw features as the experiment's extractors produce them, one pair per model input in the order
of ``info["input_names"]``:

    <modality>       float32 [batch, frames, dim]   features (zero padding after the real frames)
    <modality>_mask  bool    [batch, frames]        True for real frames

and its output is ``probabilities`` float32 [batch, classes] (``score`` [batch] for regression
models): softmax(logits / T) with the calibration temperature T of ``predictor.json``
(``temperature``, 1 when absent), as ``sertool predict`` computes them.  Batch size and frame
count are dynamic.  Features are not part of the graph: compute them with the extractors
recorded in ``OUT.json`` (``features``), e.g. ``sertool.predict.build_extractors``.

A model trained with per-speaker normalisation (``data.normalize.<m>=speaker``) has no global
statistics for that input: its graph takes the speaker-normalised features, ``(x - mean) / std``
with the per-dimension mean and std over all frames of the speaker's recordings (as
``sertool.predict.speaker_moments`` / ``sertool.data.frame_moments`` compute them), and
``OUT.json`` ``normalisation`` says so per input.

``OUT.json`` beside the model records the inputs, classes, feature provenance and the check.
The check (default on) runs the exported model on random inputs of two batch sizes and frame
counts and compares its outputs with the PyTorch model's; a difference above ``atol`` fails.
ONNX needs the ``onnx`` package to write and ``onnxruntime`` to check
(``pip install onnx onnxruntime``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sertool.predict import PredictError, load_model, read_predictor_spec
from sertool.utils import atomic_path, write_json


class ExportError(ValueError):
    """The experiment cannot be exported, or the exported model does not match."""


class DeployModel(nn.Module):
    """Normalisation + crop + model + softmax, taking (features, mask) per modality positionally."""

    def __init__(self, model: nn.Module, spec: dict, stats: dict[str, tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.model = model
        self.modalities = list((spec.get("inputs") or spec.get("features") or {}).keys())
        self.crop = {m: int(v) for m, v in (spec.get("max_steps") or {}).items() if v}
        self.regression = spec.get("task") == "regression"
        self.log_probs = spec.get("loss") == "nll"
        self.temperature = float(spec.get("temperature", 1.0))  # calibration: softmax(logits / T)
        self.normalised = []
        for m in self.modalities:
            if m in stats:
                self.register_buffer(f"{m}_mean", torch.as_tensor(np.asarray(stats[m][0], np.float32)))
                self.register_buffer(f"{m}_std", torch.as_tensor(np.asarray(stats[m][1], np.float32)))
                self.normalised.append(m)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = {}
        for i, m in enumerate(self.modalities):
            x, mask = inputs[2 * i], inputs[2 * i + 1]
            if m in self.crop:
                x, mask = x[:, : self.crop[m]], mask[:, : self.crop[m]]
            if m in self.normalised:
                x = (x - getattr(self, f"{m}_mean")) / getattr(self, f"{m}_std")
                x = x * mask.unsqueeze(-1).to(x.dtype)
            batch[m] = x
            batch[f"{m}_mask"] = mask
        out = self.model(batch).float()
        if self.regression:
            return out.reshape(-1)
        if self.temperature != 1.0:
            return (out / self.temperature).softmax(-1)
        return out.exp() if self.log_probs else out.softmax(-1)


def example_inputs(spec: dict, batch: int = 2, frames: tuple[int, ...] | int = 12, seed: int = 0) -> tuple:
    """Random features + masks (item b has frames - b real frames, at least 1) for each input."""
    g = torch.Generator().manual_seed(seed)
    features = spec.get("features") or {}
    out = []
    mods = list((spec.get("inputs") or features).keys())
    for i, m in enumerate(mods):
        T = frames[i] if isinstance(frames, tuple) else frames
        dim = int(features[m]["dim"]) if "dim" in features.get(m, {}) else _dim_of(spec, m)
        x = torch.randn(batch, T, dim, generator=g)
        lens = torch.tensor([max(1, T - b) for b in range(batch)])
        mask = torch.arange(T)[None, :] < lens[:, None]
        out += [x * mask.unsqueeze(-1), mask]
    return tuple(out)


def _dim_of(spec: dict, m: str) -> int:
    mc = spec["model_config"]
    return int(mc.get(f"{m}_dim", mc.get("input_dim")))


def load_deploy_model(exp: str | os.PathLike | None) -> tuple[DeployModel, dict, Path]:
    path, spec = read_predictor_spec(exp, speaker_adaptive=True)
    model, stats = load_model(path, spec, "cpu")
    return DeployModel(model, spec, stats).eval(), spec, path


def _input_names(spec: dict) -> list[str]:
    return [n for m in (spec.get("inputs") or spec.get("features") or {}) for n in (m, f"{m}_mask")]


def run_export(
    exp: str | os.PathLike | None, out: str | os.PathLike, *, opset: int = 17, check: bool = True, atol: float = 1e-4
) -> dict:
    """Write OUT (.onnx or .pt) and OUT.json; returns the description written to OUT.json."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".onnx", ".pt", ".ts", ".torchscript"):
        raise ExportError(f"{out}: the file name must end in .onnx (ONNX) or .pt (TorchScript)")
    try:
        deploy, spec, path = load_deploy_model(exp)
    except PredictError as e:
        raise ExportError(str(e)) from None
    names = _input_names(spec)
    ex = example_inputs(spec, batch=2, frames=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_name = "score" if deploy.regression else "probabilities"
    with atomic_path(out) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python values: checked below instead
            if suffix == ".onnx":
                _export_onnx(deploy, ex, tmp, names, output_name, opset)
                fmt = f"ONNX (opset {opset})"
            else:
                traced = torch.jit.trace(deploy, ex, check_trace=False)
                extra = {"sertool.json": json.dumps(_describe(spec, path, names, output_name))}
                torch.jit.save(traced, str(tmp), _extra_files=extra)
                fmt = "TorchScript"
        info = {**_describe(spec, path, names, output_name), "format": fmt, "file": out.name}
        if check:
            info["check"] = check_export(tmp, deploy, spec, suffix, atol)
    write_json(out.with_name(out.name + ".json"), info)
    return info


def _describe(spec: dict, path: Path, names: list[str], output_name: str) -> dict:
    return {
        "sertool_export": 1,
        "source": str(path),
        "input_names": names,
        "output": output_name,
        "task": spec.get("task"),
        "classes": spec.get("classes"),
        "max_steps": spec.get("max_steps"),
        "features": spec.get("features"),
        "model_config": spec.get("model_config"),
        "normalisation": {
            m: (
                "per speaker, outside the graph: feed (x - speaker mean) / speaker std"
                if (spec.get("normalize") or {}).get(m) == "speaker"
                else "built in (training-split mean/std; padding set to zero)"
            )
            for m in (spec.get("inputs") or spec.get("features") or {})
        },
        "temperature": float(spec.get("temperature", 1.0)),
    }


def _export_onnx(deploy: DeployModel, ex: tuple, tmp: Path, names: list[str], output_name: str, opset: int) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ModuleNotFoundError:
        raise ExportError(
            "ONNX export needs the onnx package: pip install onnx onnxruntime (or export TorchScript: -o model.pt)"
        ) from None
    dynamic = {n: ({0: "batch", 1: f"{n.removesuffix('_mask')}_frames"}) for n in names}
    dynamic[output_name] = {0: "batch"}
    try:
        torch.onnx.export(
            deploy,
            ex,
            str(tmp),
            input_names=names,
            output_names=[output_name],
            opset_version=opset,
            dynamic_axes=dynamic,
            dynamo=False,
            do_constant_folding=True,
        )
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"ONNX export failed ({type(e).__name__}: {' '.join(str(e).split())[:400]}); try TorchScript: -o model.pt"
        ) from None


def run_exported(path: str | os.PathLike, inputs: tuple, names: list[str] | None = None) -> np.ndarray:
    """Run an exported model (.onnx with onnxruntime, .pt with torch.jit) on (features, mask, ...) inputs."""
    path = Path(path)
    return _run(path, path.suffix.lower(), inputs, names)


def check_export(path: Path, deploy: DeployModel, spec: dict, suffix: str, atol: float = 1e-4) -> dict:
    """Exported vs PyTorch outputs on inputs of other shapes than the export's example."""
    worst = 0.0
    n_mods = len(_input_names(spec)) // 2
    cases = [(1, 7), (3, 31)]
    for batch, frames in cases:
        inputs = example_inputs(spec, batch=batch, frames=tuple([frames] * n_mods), seed=batch)
        with torch.no_grad():
            ref = deploy(*inputs).numpy()
        got = _run(path, suffix, inputs, _input_names(spec))
        if got.shape != ref.shape:
            raise ExportError(
                f"exported model gives outputs of shape {got.shape}, PyTorch {ref.shape} "
                f"(batch {batch}, {frames} frames)"
            )
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if worst > atol:
        raise ExportError(
            f"the exported model's outputs differ from PyTorch's by up to {worst:.3g} (> {atol:g}); "
            "the model has shape-dependent code the exporter cannot follow; try the other format"
        )
    return {"cases": [{"batch": b, "frames": f} for b, f in cases], "max_abs_diff": worst, "atol": atol}


def _run(path: Path, suffix: str, inputs: tuple, names: list[str] | None = None) -> np.ndarray:
    if suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise ExportError(
                "checking an ONNX export needs onnxruntime: pip install onnxruntime (or skip the check: --no-check)"
            ) from None
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}  # an input the graph does not use is left out
        names = names or [i.name for i in sess.get_inputs()]
        feed = {
            n: (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            for n, t in zip(names, inputs)
            if n in wanted
        }
        return np.asarray(sess.run(None, feed)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream but works
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return model(*[torch.as_tensor(t) for t in inputs]).numpy()
