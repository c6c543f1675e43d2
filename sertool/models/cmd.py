"""CMD: the distilled student of Cross-Modal Distillation, and its fine-tuning for classification.

Kim & Kang. "Cross-modal distillation with audio-text fusion for fine-grained emotion
classification using BERT and Wav2vec 2.0." Neurocomputing 506:168-183, 2022.

:class:`DistillStudent` is the student of ``sertool distill``: per modality an input encoder
(:mod:`sertool.models.cmd_inputs`) on the waveform / token ids, then the CMD student core
(:class:`sertool.models.cmd_student.CMDStudent`: Conv1d to d = 32, L = 3 blocks of
cross-attention then self-attention, 2 heads), or for a unimodal student self-attention blocks
only (:class:`UnimodalCore`).  It returns per-time-step states for the distillation loss.

:class:`CMD` (registry key ``cmd``) fine-tunes such a student through the train stage
(``sertool train FEATS -m cmd --init DISTILL_EXP``), as the paper's Section 3.3: average pooling
of each modality's states, two FC layers (``d -> hidden = 32 -> classes``, ReLU between), the
per-modality softmax of logits / kappa averaged over the modalities; ``forward`` returns the log of
that average, so that the NLL loss (``train.loss: nll``) is the cross-entropy of the averaged
distribution.  kappa defaults to the distillation's temperature (``model.kappa: null``).
:meth:`CMD.prepare_config` reads the student from ``model.init`` and sets the inputs the student
reads (``data.audio: wave``, ``data.text: tokens:<teacher store>`` over the student's vocabulary,
or ``tokenizer:<teacher model>``); the student's architecture is recorded in the experiment's
config (``model.student``), so the experiment is rebuilt without the distillation folder.

Not specified by the paper (sertool choices, docs/distill.md): the fine-tuning batches hold
320,000 audio samples (the distillation budget; 4,096 tokens for a text-only student), Adam
1e-4 for 30 epochs with early stopping after 10 epochs without a better dev UA.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from .blocks import TransformerLayer, masked_mean
from .cmd_inputs import SAMPLE_RATE, build_input_encoder
from .encoders import ConvStack
from .registry import SERModel, register

MODALITIES = ("audio", "text")
STUDENT_FORMAT = "sertool-cmd-student"


class UnimodalCore(nn.Module):
    """One modality: Conv1d to d channels, L self-attention blocks (no cross-attention)."""

    def __init__(self, modality: str, in_dim: int, *, d, proj_kernel, num_heads, num_blocks, ffn_dim, norm, dropout):
        super().__init__()
        self.modality = modality
        self.proj = nn.ModuleDict({modality: ConvStack(in_dim, [[d, proj_kernel, 1]], activation="none")})
        self.self_attn = nn.ModuleList(
            nn.ModuleDict({modality: TransformerLayer(d, num_heads, ffn_dim, norm=norm, dropout=dropout)})
            for _ in range(num_blocks)
        )

    def encode(self, batch):
        m = self.modality
        x, mask = self.proj[m](batch[m], batch[f"{m}_mask"])
        for blk in self.self_attn:
            x = blk[m](x, mask)
        return {m: x}, {m: mask}


class DistillStudent(nn.Module):
    """Input encoders + CMD student core, built from a JSON ``spec`` (``student``: the settings,
    ``inputs``: each input encoder's spec).

    ``forward(batch)`` takes ``audio``/``audio_mask`` ``[B, N]`` (waveform samples) and
    ``text``/``text_mask`` ``[B, L]`` (token ids) and returns per-modality states ``[B, T, d]``
    and masks.
    """

    def __init__(self, spec: dict, encoders: dict | None = None):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        s = spec["student"]
        self.modalities = tuple(s["modalities"])
        if (
            not self.modalities
            or any(m not in MODALITIES for m in self.modalities)
            or len(set(self.modalities)) != len(self.modalities)
        ):
            raise ValueError(
                f"student.modalities must be [audio, text], [audio] or [text], got {list(self.modalities)}"
            )
        encoders = encoders or {}
        self.encoders = nn.ModuleDict(
            {m: encoders[m] if m in encoders else build_input_encoder(spec["inputs"][m]) for m in self.modalities}
        )
        kw = {k: s[k] for k in ("d", "proj_kernel", "num_heads", "num_blocks", "ffn_dim", "norm", "dropout")}
        if len(self.modalities) == 2:
            from .registry import build_model

            self.core = build_model(
                "cmd_student",
                audio_dim=self.encoders["audio"].out_dim,
                text_dim=self.encoders["text"].out_dim,
                n_classes=1,
                fusion=s["fusion"],
                **kw,
            )
            del self.core.heads  # the fine-tuning heads live in CMD
        else:
            m = self.modalities[0]
            self.core = UnimodalCore(m, self.encoders[m].out_dim, **kw)
        if s.get("freeze_input_encoders"):
            for p in self.encoders.parameters():
                p.requires_grad_(False)
        self.d = int(s["d"])

    def forward(self, batch: dict):
        inputs = {}
        for m in self.modalities:
            inputs[m], inputs[f"{m}_mask"] = self.encoders[m](batch[m], batch[f"{m}_mask"])
        return self.core.encode(inputs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def modality_parameters(student: DistillStudent) -> dict[str, int]:
    """Parameters per modality: every parameter whose name names the modality (audio queries
    text = audio side)."""
    out = {m: 0 for m in student.modalities}
    for name, p in student.named_parameters():
        parts = name.split(".")
        for m in student.modalities:
            if m in parts:
                out[m] += p.numel()
    return out


def save_student(student: DistillStudent, path: Path, meta: dict | None = None) -> None:
    from sertool.utils import save_tensors

    save_tensors(path, student.state_dict(), {"format": STUDENT_FORMAT, "spec": student.spec, **(meta or {})})


def read_student_spec(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{path}: not a sertool CMD student")
    return json.loads(meta["spec"])


def load_student(path: Path) -> DistillStudent:
    from sertool.weights import load_tensors

    student = DistillStudent(read_student_spec(path))
    state = {k: v for k, v in load_tensors(path).items() if not k.startswith("heads.")}  # an older fine-tuned student
    student.load_state_dict(state)
    return student


@register("cmd")
class CMD(SERModel):
    """A distilled CMD student fine-tuned for classification (see the module docstring)."""

    def __init__(self, *, init, student, modalities, n_classes, hidden, kappa, task):
        super().__init__()
        if not student:
            raise ValueError(
                "model cmd fine-tunes a distilled student: give --init DISTILL_EXP (the output folder of "
                "`sertool distill`), i.e. model.init"
            )
        if task != "classification":
            raise ValueError(f"model cmd is a classifier (model.task: classification), got {task!r}")
        self.init = init
        self.student = DistillStudent(student)
        self.modalities = self.student.modalities
        if list(modalities) != list(self.modalities):
            raise ValueError(
                f"model.modalities {list(modalities)}: the student of {init} reads {list(self.modalities)}"
            )
        self.kappa = float(kappa if kappa is not None else 1.0)
        self.heads = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(self.student.d, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
                for m in self.modalities
            }
        )

    def modality_logits(self, batch: dict) -> dict[str, torch.Tensor]:
        x, m = self.student(batch)
        return {k: self.heads[k](masked_mean(x[k], m[k])) for k in self.modalities}

    def combine(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """log of the per-modality softmax(logits / kappa), averaged over the modalities."""
        prob = sum((logits[k] / self.kappa).softmax(-1) for k in self.modalities) / len(self.modalities)
        return torch.log(prob.clamp_min(1e-12))

    def forward(self, batch: dict, return_attention: bool = False):
        out = self.combine(self.modality_logits(batch))
        return (out, {}) if return_attention else out

    def load_pretrained(self) -> None:
        """The distilled student's weights (the train stage calls this for a new run)."""
        from sertool.weights import load_tensors

        path = Path(self.init) / "student.safetensors"
        if read_student_spec(path) != self.student.spec:
            raise ValueError(f"{path}: the student changed since this experiment was configured; train again")
        self.student.load_state_dict({k: v for k, v in load_tensors(path).items() if not k.startswith("heads.")})

    @classmethod
    def prepare_config(cls, cfg: dict) -> None:
        """Fill ``model`` and ``data`` from the distillation experiment ``model.init``."""
        from sertool.config import load_config_file

        m, data = cfg["model"], cfg["data"]
        if not m.get("init"):
            raise ValueError(
                "model cmd fine-tunes a distilled student: give --init DISTILL_EXP (the output folder of "
                "`sertool distill`)"
            )
        init = Path(m["init"])
        if not (init / "distill.yaml").exists() or not (init / "student.safetensors").exists():
            raise ValueError(
                f"--init {init}: not a distillation experiment (no distill.yaml + student.safetensors); "
                "give the output folder of `sertool distill`"
            )
        rec = load_config_file(init / "distill.yaml")
        spec = read_student_spec(init / "student.safetensors")
        mods = list(spec["student"]["modalities"])
        m.update(init=str(init.resolve()), student=spec, modalities=mods)
        if m.get("kappa") is None:
            m["kappa"] = float(rec["distill"]["kappa"])
        for mod in ("audio", "text", "visual"):
            want = _student_input(mod, rec, spec) if mod in mods else None
            if data.get(mod) not in (None, want):
                raise ValueError(
                    f"--{mod} {data[mod]}: the student of {init} reads "
                    + (f"{want}" if want else f"no {mod} input")
                    + " (its inputs come from --init)"
                )
            data[mod] = want
        if "text" in mods and str(data["text"]).startswith("tokens:"):
            vocab = json.loads((init / "vocab.json").read_text())
            data["vocab"] = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        max_audio_s = float((rec.get("distill") or {}).get("max_audio_s") or 0)
        if "audio" in mods and max_audio_s and not (data.get("max_steps") or {}).get("audio"):
            data["max_steps"]["audio"] = int(round(max_audio_s * SAMPLE_RATE))
        if not cfg["train"]["max_batch_frames"]:  # the paper's budget: audio samples (tokens, text only)
            cfg["train"]["max_batch_frames"] = 320000 if "audio" in mods else 4096


def _student_input(modality: str, rec: dict, spec: dict) -> str:
    """The raw input the student's ``modality`` encoder reads."""
    if modality == "audio":
        return "wave"
    teacher = rec["teachers"]["text"]
    if spec["inputs"]["text"]["type"] == "embedding":  # a cached teacher: ids over its tokens
        return f"tokens:{teacher['path']}"
    return f"tokenizer:{teacher['model']}"
