"""Shared by the Whisper tests: a tiny random Whisper config, a speech-like signal, per-row cosines."""

from __future__ import annotations

import numpy as np

SR = 16000


def tiny_whisper_config():
    """d_model 32, 2 encoder layers, 2 heads, 80 Mel bins, the full 1,500 encoder positions."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """A 180 Hz tone, amplitude-modulated at 3 Hz, plus a little noise: n samples at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def cosines(a, b) -> np.ndarray:
    """Cosine similarity of a and b along the last axis."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
