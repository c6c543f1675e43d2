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

A model that owns its encoder takes its raw input: ``whisper_ft`` the 16 kHz waveform
(``audio`` float32 [batch, samples] + ``audio_mask``; the per-clip z-score, Whisper's log-Mel and
the encoder are in the graph: :class:`WhisperFTGraph`), ``text_ft`` its tokenizer's ids (``text``
int64 [batch, tokens] + ``text_mask``).  For these the check compares with the model's own forward
on the batch ``sertool predict`` builds.

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


def raw_inputs(spec: dict) -> dict[str, str]:
    """The model inputs read raw, by kind: ``wave`` (``data.audio: wave``, 16 kHz samples) or ``ids``
    (``data.text: tokenizer:MODEL`` / ``tokens:STORE``, int64 token ids)."""
    out = {}
    for m, name in (spec.get("inputs") or {}).items():
        name = str(name)
        if name == "wave":
            out[m] = "wave"
        elif name.startswith(("tokenizer:", "tokens:")):
            out[m] = "ids"
    return out


class WaveformLogMel(nn.Module):
    """:meth:`WhisperAudioEncoder.log_mel` (Whisper's log-Mel of each clip's own frames) as graph
    operations: a batch of zero-padded clips ``[B, N]`` (N at most ``n_frames`` x 160) + samples per
    clip -> ``[B, n_mels, n_frames]`` (zeros past each clip's frames) and the frames each clip fills
    (2 x ceil(samples / 320)).  The STFT is a strided convolution with the
    Hann-windowed DFT basis (exportable at any ONNX opset; torch.stft exports only with its deprecated
    ``return_complex=False``); the centre padding reflects the first samples as torch.stft does, and
    every frame a clip fills sees only its own samples and zeros, as the per-clip STFT does."""

    def __init__(self, n_mels: int, n_frames: int):
        super().__init__()
        from sertool.models.whisper_encoder import HOP, N_FFT, SAMPLE_RATE, slaney_mel_filters

        self.n_fft, self.hop, self.n_frames = N_FFT, HOP, int(n_frames)
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)
        angle = 2 * np.pi * k[:, None] * n[None, :] / N_FFT
        window = torch.hann_window(N_FFT, dtype=torch.float64)
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # [2K, N_FFT]
        self.register_buffer("basis", basis.float()[:, None, :])
        fb = slaney_mel_filters(1 + N_FFT // 2, n_mels, 0.0, 8000.0, SAMPLE_RATE)
        self.register_buffer("filters", torch.from_numpy(np.ascontiguousarray(fb.T, dtype=np.float32)))

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = 2 * torch.div(lengths + 2 * self.hop - 1, 2 * self.hop, rounding_mode="floor")
        half, size = self.n_fft // 2, self.n_frames * self.hop + self.n_fft // 2
        # zeros past each clip up to the full window (every clip gets n_frames frames: the encoder's
        # masked path then sees one fixed length, the only one its traced graph can take)
        zeros = torch.zeros_like(wave[:, :1]).expand(-1, size)
        x = torch.cat([wave, zeros], 1)[:, :size]
        x = torch.cat([x[:, 1 : half + 1].flip(1), x], 1)  # torch.stft's centre: reflect the start
        spec = nn.functional.conv1d(x[:, None, :], self.basis, stride=self.hop)[:, :, : self.n_frames]
        k = spec.shape[1] // 2
        power = spec[:, :k] ** 2 + spec[:, k:] ** 2
        logmel = torch.clamp(torch.matmul(self.filters, power), min=1e-10).log10()
        steps = torch.arange(self.n_frames, device=wave.device)
        frame_ok = (steps[None, :] < frames[:, None])[:, None, :]
        top = logmel.masked_fill(~frame_ok, -1e30).amax(dim=(1, 2), keepdim=True)
        logmel = torch.maximum(logmel, top - 8.0)
        return (logmel + 4.0) / 4.0 * frame_ok.to(logmel.dtype), frames


class WhisperFTGraph(nn.Module):
    """:meth:`WhisperFT.forward` from the waveform, in graph operations (the model's own forward reads
    the clips on the host in numpy): the z-scored samples scaled to ``WAVE_RMS``, :class:`WaveformLogMel`,
    the encoder, then the model's own head (:meth:`WhisperFT.head`).
    ``run_export`` checks it against the model's own forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.log_mel = WaveformLogMel(model.encoder.n_mels, model.encoder.max_mel_frames)

    def forward(self, wave: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from sertool.models.whisper_ft import WAVE_RMS

        mel, frames = self.log_mel(wave * WAVE_RMS, mask.sum(1))
        return self.model.head(self.model.encoder(mel, frames), (frames + 1) // 2)


def standardize_waves(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each clip's z-score over its real samples (:func:`sertool.data.standardize_wave`), zeros past it."""
    m = mask.to(x.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(1, keepdim=True) / n
    std = ((((x - mean) * m) ** 2).sum(1, keepdim=True) / n).sqrt()
    return (x - mean) / (std + 1e-7) * m


class DeployModel(nn.Module):
    """Normalisation + crop + model + softmax, taking (features, mask) per modality positionally.
    A raw waveform input (whisper_ft) is z-scored per clip in the graph and goes through
    :class:`WhisperFTGraph`; token ids go to the model as they are."""

    def __init__(self, model: nn.Module, spec: dict, stats: dict[str, tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.model = model
        self.modalities = list((spec.get("inputs") or spec.get("features") or {}).keys())
        self.crop = {m: int(v) for m, v in (spec.get("max_steps") or {}).items() if v}
        self.regression = spec.get("task") == "regression"
        self.log_probs = spec.get("loss") == "nll"
        self.temperature = float(spec.get("temperature", 1.0))  # calibration: softmax(logits / T)
        self.raw = raw_inputs(spec)
        self.waveform_graph = None
        if (spec.get("model_config") or {}).get("name") == "whisper_ft":  # its forward reads the clips in numpy
            self.waveform_graph = WhisperFTGraph(model)
        self.normalised = []
        for m in self.modalities:
            if m in stats and m not in self.raw:
                self.register_buffer(f"{m}_mean", torch.as_tensor(np.asarray(stats[m][0], np.float32)))
                self.register_buffer(f"{m}_std", torch.as_tensor(np.asarray(stats[m][1], np.float32)))
                self.normalised.append(m)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = {}
        for i, m in enumerate(self.modalities):
            x, mask = inputs[2 * i], inputs[2 * i + 1]
            if self.raw.get(m) == "wave":  # per clip, before the crop (as predict and the train stage do)
                x = standardize_waves(x, mask)
            if m in self.crop:
                x, mask = x[:, : self.crop[m]], mask[:, : self.crop[m]]
            if m in self.normalised:
                x = (x - getattr(self, f"{m}_mean")) / getattr(self, f"{m}_std")
                x = x * mask.unsqueeze(-1).to(x.dtype)
            batch[m] = x
            batch[f"{m}_mask"] = mask
        if self.waveform_graph is not None:
            m = self.modalities[0]
            out = self.waveform_graph(batch[m], batch[f"{m}_mask"]).float()
        else:
            out = self.model(batch).float()
        if self.regression:
            return out.reshape(-1)
        if self.temperature != 1.0:
            return (out / self.temperature).softmax(-1)
        return out.exp() if self.log_probs else out.softmax(-1)


def example_inputs(spec: dict, batch: int = 2, frames: tuple[int, ...] | int = 12, seed: int = 0) -> tuple:
    """Random features + masks (item b has frames - b real frames, at least 1) for each input; a
    waveform input gets 160 samples (10 ms) per frame, item b a quarter of them fewer per b (clips of
    different Mel lengths), token ids are random ids of the encoder's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    features = spec.get("features") or {}
    raw = raw_inputs(spec)
    out = []
    mods = list((spec.get("inputs") or features).keys())
    for i, m in enumerate(mods):
        T = frames[i] if isinstance(frames, tuple) else frames
        if m in raw:
            out += _raw_example(spec, raw[m], batch, T, g)
            continue
        dim = int(features[m]["dim"]) if "dim" in features.get(m, {}) else _dim_of(spec, m)
        x = torch.randn(batch, T, dim, generator=g)
        lens = torch.tensor([max(1, T - b) for b in range(batch)])
        mask = torch.arange(T)[None, :] < lens[:, None]
        out += [x * mask.unsqueeze(-1), mask]
    return tuple(out)


def _raw_example(spec: dict, kind: str, batch: int, T: int, g: torch.Generator) -> list[torch.Tensor]:
    if kind == "wave":
        T *= 160
        lens = torch.tensor([max(1, T - b * T // 4) for b in range(batch)])
        mask = torch.arange(T)[None, :] < lens[:, None]
        return [torch.randn(batch, T, generator=g) * mask, mask]
    vocab = int(((spec.get("model_config") or {}).get("encoder_config") or {}).get("vocab_size") or 100)
    lens = torch.tensor([max(1, T - b) for b in range(batch)])
    mask = torch.arange(T)[None, :] < lens[:, None]
    return [torch.randint(0, vocab, (batch, T), generator=g) * mask, mask]


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
    owned = [m for m, v in ((spec.get("model_config") or {}).get("input_encoders") or {}).items() if v]
    if owned:  # their Whisper front end reads the clips in numpy: a trace would bake one example in
        raise ExportError(
            f"{path}: export of a model on fine-tuned input encoders (model.input_encoders: {', '.join(owned)}) "
            "is not supported yet; `sertool predict` runs it (whisper_ft and text_ft alone export)"
        )
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
                try:
                    traced = torch.jit.trace(deploy, ex, check_trace=False)
                except Exception as e:  # noqa: BLE001 - one line, never a traceback
                    raise ExportError(
                        f"TorchScript export failed ({type(e).__name__}: {' '.join(str(e).split())[:400]})"
                    ) from None
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
        "normalisation": {m: _normalisation_note(spec, m) for m in (spec.get("inputs") or spec.get("features") or {})},
        "temperature": float(spec.get("temperature", 1.0)),
    }


def _normalisation_note(spec: dict, m: str) -> str:
    kind = raw_inputs(spec).get(m)
    if kind == "wave":
        return (
            "built in: feed 16 kHz mono samples [batch, samples] (any level; zeros past each clip); "
            "each clip is z-scored over its real samples, then Whisper's log-Mel and encoder run in the graph"
        )
    if kind == "ids":
        return (
            f"none: feed int64 token ids [batch, tokens] of {spec['inputs'][m]} (special tokens included, 0 past them)"
        )
    if (spec.get("normalize") or {}).get(m) == "speaker":
        return "per speaker, outside the graph: feed (x - speaker mean) / speaker std"
    return "built in (training-split mean/std; padding set to zero)"


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
        ref = reference_outputs(deploy, spec, inputs)
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


def reference_outputs(deploy: DeployModel, spec: dict, inputs: tuple) -> np.ndarray:
    """What the PyTorch model gives for exported-graph inputs: the deploy module itself for feature
    models; for raw inputs the model's own forward on the batch ``sertool predict`` builds (each
    item's real steps, a waveform z-scored on its own: sertool.data.standardize_wave)."""
    if not deploy.raw:
        with torch.no_grad():
            return deploy(*inputs).numpy()
    from sertool.data import standardize_wave
    from sertool.predict import collate, outputs_to_probabilities

    items = []
    for b in range(inputs[0].shape[0]):
        item = {}
        for i, m in enumerate(deploy.modalities):
            x = inputs[2 * i][b][inputs[2 * i + 1][b]].numpy()
            item[m] = standardize_wave(x) if deploy.raw.get(m) == "wave" else x
        items.append(item)
    stats = {m: (getattr(deploy, f"{m}_mean").numpy(), getattr(deploy, f"{m}_std").numpy()) for m in deploy.normalised}
    with torch.inference_mode():
        out = deploy.model(collate(items, stats, deploy.crop))
    return outputs_to_probabilities(out, spec)


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
