"""Model registry, configs, parameter counts and padded-batch behaviour of every model."""

import pytest
import torch
import yaml

from sertool.models import build_model, count_parameters, describe_models, list_models, load_config

KEYS = [
    "lgcct",
    "ks_transformer",
    "self_attn",
    "cross_attn",
    "cma",
    "cmd_student",
    "cmd",
    "probe",
    "whisper_ft",
    "text_ft",
    "wav2vec2_ft",
]


def params(key, overrides=()):
    with torch.device("meta"):
        return count_parameters(build_model(key, list(overrides)))


# ----------------------------------------------------------------------------- registry / configs
def test_list_models():
    assert list_models() == KEYS


def test_every_default_config_builds_and_has_train_settings():
    for key in KEYS:
        cfg = load_config(key)
        assert cfg["model"]["name"] == key
        for section in ("optim", "schedule", "train"):
            assert section in cfg, (key, section)
        assert cfg["optim"]["lr"] > 0 and cfg["train"]["epochs"] > 0 and cfg["train"]["batch_size"] > 0


def test_unknown_keys_are_rejected_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="model.not_a_key"):
        load_config("lgcct", ["model.not_a_key=3"])
    with pytest.raises(ValueError, match="optimiser"):
        load_config("lgcct", ["optimiser.lr=3"])
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"model": {"d": 40, "heads_typo": 2}}))
    with pytest.raises(ValueError, match="model.heads_typo"):
        load_config("lgcct", path=str(user))
    with pytest.raises(ValueError, match="model.bogus"):
        build_model("probe", bogus=3)


def test_overrides_and_user_file(tmp_path):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"model": {"d": 40}, "optim": {"lr": 0.01}}))
    cfg = load_config("lgcct", ["model.gates=false", "optim.lr=1e-4", "model.num_heads=4"], path=str(user))
    assert cfg["model"]["d"] == 40 and cfg["model"]["gates"] is False and cfg["model"]["num_heads"] == 4
    assert cfg["optim"]["lr"] == pytest.approx(1e-4) and isinstance(cfg["optim"]["lr"], float)
    with pytest.raises(ValueError):
        load_config("lgcct", ["model.gates=maybe"])
    cfg = load_config("self_attn", ["model.fixed_len.audio=200", "model.modalities=[audio, text]"])
    assert cfg["model"]["fixed_len"] == {"audio": 200, "text": 128, "visual": 32}
    assert cfg["model"]["modalities"] == ["audio", "text"]


def test_build_from_config_dict_and_dims():
    cfg = load_config("probe")
    m = build_model(cfg, input_dim=10, n_classes=3)
    assert m({"audio": torch.randn(2, 4, 10)}).shape == (2, 3)
    m = build_model({"name": "probe", "modality": "text", "input_dim": 5}, **{"model.n_classes": 2})
    assert m.modalities == ("text",)
    assert m({"text": torch.randn(2, 4, 5)}).shape == (2, 2)
    assert m.config["model"]["n_classes"] == 2
    mlp = build_model(cfg, input_dim=10, n_classes=3, **{"model.hidden": 16})
    assert sum(p.numel() for p in mlp.parameters()) == (20 * 16 + 16) + (16 * 3 + 3)
    x, mask = torch.randn(2, 4, 10), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    padded = torch.cat([x, 100 * torch.randn(2, 3, 10)], 1)  # padding never reaches the output
    mlp.eval()
    torch.testing.assert_close(
        mlp({"audio": x, "audio_mask": mask}),
        mlp({"audio": padded, "audio_mask": torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)}),
    )
    with pytest.raises(ValueError, match="hidden"):
        build_model(cfg, input_dim=10, n_classes=3, **{"model.hidden": -1})


def test_describe_models_and_prefixed_overrides():
    rows = dict(describe_models())
    assert list(rows) == KEYS
    assert rows["lgcct"] == params("lgcct")
    rows = dict(describe_models(["lgcct.model.gates=false", "model.n_classes=7"]))
    assert rows["lgcct"] == params("lgcct", ["model.gates=false"])
    assert rows["ks_transformer"] == params("ks_transformer", ["model.n_classes=7"])
    with pytest.raises(ValueError, match="model.nope"):
        describe_models(["model.nope=1"])
    with pytest.raises(ValueError, match="model.nope"):
        describe_models(["lgcct.model.nope=1"])


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "overrides,paper",
    [
        ([], 432_000),
        (["model.gates=false"], 429_000),
        (["model.encoders=false"], 354_000),
        (["model.transformer=false"], 203_000),
    ],
)
def test_lgcct_parameter_counts_within_3_percent_of_paper(overrides, paper):
    n = params("lgcct", overrides)
    assert abs(n - paper) / paper < 0.03, (overrides, n, paper)


def test_ks_transformer_matches_reference_code_count():
    # reference implementation, IEMOCAP config (512/1024, FFN 256/512, 5/3/2 layers, 8 heads, 4 classes)
    assert params("ks_transformer") == 85_324_676


def test_rajan_models_match_released_counts():
    assert params("self_attn") == 1_645_892
    assert params("cross_attn") == 1_820_132


def test_ks_ablations_build():
    full = params("ks_transformer")
    assert params("ks_transformer", ["model.ccab_blocks=0"]) < params("ks_transformer", ["model.ccab_blocks=1"]) < full
    assert params("ks_transformer", ["model.sparse=false"]) == full
    assert params("ks_transformer", ["model.fem=false"]) < full


# ----------------------------------------------------------------------------- forward passes
SMALL = {
    "lgcct": [
        "model.audio_dim=6",
        "model.text_dim=8",
        "model.audio_conv=[[8,3,1]]",
        "model.rnn_hidden=4",
        "model.d=10",
        "model.num_heads=2",
        "model.cross_layers=1",
        "model.transformer_layers=1",
    ],
    "ks_transformer": [
        "model.audio_dim=16",
        "model.text_dim=24",
        "model.num_heads=2",
        "model.audio_ffn=16",
        "model.text_ffn=16",
        "model.fem_layers=1",
        "model.ccab_blocks=1",
        "model.dfm_layers=1",
    ],
    "self_attn": [
        "model.audio_dim=6",
        "model.text_dim=8",
        "model.visual_dim=5",
        "model.gru_hidden=6",
        "model.num_heads=2",
        "model.fixed_len={audio: 30, text: 12, visual: 10}",
        "model.time_conv_out={audio: 15, text: null, visual: 8}",
    ],
    "cma": [
        "model.audio_dim=12",
        "model.text_dim=10",
        "model.audio_conv=[[16,3,2],[16,3,2]]",
        "model.lstm_hidden=8",
        "model.d=16",
        "model.num_heads=2",
        "model.ffn_dim=16",
    ],
    "cmd_student": ["model.audio_dim=12", "model.text_dim=10", "model.d=8", "model.ffn_dim=16"],
    "probe": ["model.input_dim=6"],
}
SMALL["cross_attn"] = SMALL["self_attn"]
DIMS = {
    "lgcct": {"audio": 6, "text": 8},
    "ks_transformer": {"audio": 16, "text": 24},
    "self_attn": {"audio": 6, "text": 8, "visual": 5},
    "cma": {"audio": 12, "text": 10},
    "cmd_student": {"audio": 12, "text": 10},
    "probe": {"audio": 6},
}
DIMS["cross_attn"] = DIMS["self_attn"]


def make_batch(dims, lengths, pad_to=None, aligned=False, seed=0):
    """Per-item lengths per modality; items padded to pad_to (or the max) with garbage."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for i, (m, D) in enumerate(dims.items()):
        ls = lengths if aligned else [L + 3 * i for L in lengths]
        T = max(ls) if pad_to is None else pad_to
        x = 10 * torch.randn(len(ls), T, D, generator=g)  # garbage in padding
        real = torch.randn(len(ls), T, D, generator=torch.Generator().manual_seed(seed + 7 + i))
        mask = torch.arange(T)[None] < torch.tensor(ls)[:, None]
        batch[m] = torch.where(mask[..., None], real, x)
        batch[f"{m}_mask"] = mask
    return batch


def item(batch, b, dims):
    out = {}
    for m in dims:
        n = int(batch[f"{m}_mask"][b].sum())
        out[m] = batch[m][b : b + 1, :n]
        out[f"{m}_mask"] = batch[f"{m}_mask"][b : b + 1, :n]
    return out


# cmd wraps a distilled student (test_distill.py); whisper_ft and wav2vec2_ft read waveforms
# (test_whisper_ft.py, test_wav2vec2_ft.py), text_ft token ids (test_text_ft.py)
@pytest.mark.parametrize("key", [k for k in KEYS if k not in ("cmd", "whisper_ft", "text_ft", "wav2vec2_ft")])
def test_forward_backward_and_padding_invariance(key):
    torch.manual_seed(0)
    model = build_model(key, SMALL[key]).eval()
    dims = DIMS[key]
    assert set(model.modalities) == set(dims)
    aligned = key == "lgcct"
    batch = make_batch(dims, [9, 5, 12], pad_to=20, aligned=aligned)
    out = model(batch)
    n_classes = model.config["model"]["n_classes"]
    assert out.shape == (3, n_classes) and torch.isfinite(out).all()
    for b in range(3):  # each item alone, unpadded, gives the same output
        torch.testing.assert_close(model(item(batch, b, dims))[0], out[b], rtol=1e-4, atol=1e-5)
    model.train()
    loss = model(batch).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("key", ["lgcct", "ks_transformer", "self_attn", "cross_attn", "cma"])
def test_return_attention(key):
    model = build_model(key, SMALL[key]).eval()
    batch = make_batch(DIMS[key], [6, 4], aligned=key == "lgcct")
    out, attn = model(batch, return_attention=True)
    torch.testing.assert_close(out, model(batch))
    assert attn
    for w in attn.values():
        ws = w if isinstance(w, list) else [w]
        for x in ws:
            assert x.dim() == 4 and torch.all(x >= 0)


def test_lgcct_regression_classification_and_options():
    b = make_batch(DIMS["lgcct"], [7, 4], aligned=True)
    small = SMALL["lgcct"]
    assert build_model("lgcct", small)(b).shape == (2, 1)
    assert build_model("lgcct", small + ["model.task=classification", "model.n_classes=6"])(b).shape == (2, 6)
    for ov in (
        ["model.gates=false"],
        ["model.encoders=false"],
        ["model.transformer=false"],
        ["model.gate_mode=linear_ln", "model.norm=pre", "model.length_scale=queries"],
        ["model.pooling=mean", "model.length_scale=none"],
    ):
        assert build_model("lgcct", small + ov)(b).shape == (2, 1)
    with pytest.raises(ValueError, match="aligned"):
        build_model("lgcct", small)(make_batch(DIMS["lgcct"], [7, 4]))


def test_rajan_modality_subsets_and_local_conv():
    small = SMALL["self_attn"]
    for key in ("self_attn", "cross_attn"):
        for mods in (["audio", "text"], ["audio", "visual"], ["text", "visual"]):
            m = build_model(key, small + [f"model.modalities=[{', '.join(mods)}]"]).eval()
            dims = {k: DIMS[key][k] for k in mods}
            assert m(make_batch(dims, [5, 8])).shape == (2, 7)
        m = build_model(key, small + ["model.conv=local"]).eval()
        batch = make_batch(DIMS[key], [9, 5, 12], pad_to=15)
        out = m(batch)
        torch.testing.assert_close(m(item(batch, 1, DIMS[key]))[0], out[1], rtol=1e-4, atol=1e-5)
    m = build_model("self_attn", small + ["model.modalities=[audio]"]).eval()
    assert m(make_batch({"audio": 6}, [5, 8])).shape == (2, 7)
    with pytest.raises(ValueError):
        build_model("cross_attn", small + ["model.modalities=[audio]"])


def test_cma_unimodal_and_end_to_end():
    small = SMALL["cma"]
    for mods, dims in ((["audio"], {"audio": 12}), (["text"], {"text": 10})):
        m = build_model("cma", small + [f"model.modalities=[{mods[0]}]"]).eval()
        assert m.modalities == tuple(mods)
        assert m(make_batch(dims, [9, 6])).shape == (2, 4)
    tiny = [
        "model.frontend=end_to_end",
        "model.wav2vec2_config.hidden_size=16",
        "model.wav2vec2_config.num_hidden_layers=1",
        "model.wav2vec2_config.num_attention_heads=2",
        "model.wav2vec2_config.intermediate_size=32",
        "model.wav2vec2_config.conv_dim=[8,8,8,8,8,8,8]",
        "model.bert_config.hidden_size=16",
        "model.bert_config.num_hidden_layers=1",
        "model.bert_config.num_attention_heads=2",
        "model.bert_config.intermediate_size=32",
        "model.bert_config.vocab_size=50",
    ]
    m = build_model("cma", small + tiny)
    frozen = [p for p in m.wav2vec2.feature_extractor.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in m.bert.parameters())
    batch = {
        "audio": torch.randn(2, 8000),
        "audio_mask": torch.arange(8000)[None] < torch.tensor([[8000], [5000]]),
        "text": torch.randint(0, 50, (2, 7)),
        "text_mask": torch.ones(2, 7, dtype=torch.bool),
    }
    out = m(batch)
    assert out.shape == (2, 4)
    out.sum().backward()


def test_cmd_student_outputs():
    m = build_model("cmd_student", SMALL["cmd_student"] + ["model.embed_dim=20"]).eval()
    batch = make_batch(DIMS["cmd_student"], [9, 6])
    logp = m(batch)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))
    res = m(batch, return_embeddings=True)
    assert res["audio"].shape == (2, 9, 20) and res["text"].shape == (2, 12, 20)
    assert torch.equal(res["audio_mask"], batch["audio_mask"])
    probs = sum(v.softmax(-1) for v in res["modality_logits"].values()) / 2
    torch.testing.assert_close(res["logits"], probs.log())
    late = build_model("cmd_student", SMALL["cmd_student"] + ["model.fusion=late"]).eval()
    assert late(batch).shape == (2, 4)
    wav = build_model("cmd_student", SMALL["cmd_student"] + ["model.audio_input=waveform", "model.text_input=ids"])
    res = wav({"audio": torch.randn(2, 16000), "text": torch.randint(0, 100, (2, 5))}, return_embeddings=True)
    assert res["audio"].shape[1] == 49  # wav2vec 2.0 frame rate: 16000 samples -> 49 frames
    # paper sizes: d = 32, 2 heads, 3 blocks
    cfg = load_config("cmd_student")["model"]
    assert (cfg["d"], cfg["num_heads"], cfg["num_blocks"]) == (32, 2, 3)


def test_default_configs_are_read_once_per_process(tmp_path, monkeypatch):
    """A conf/*.yaml edited while a run goes on (a newer sertool installed over it) must not reach
    the folds still to be built: the defaults are read once, and each caller gets its own copy."""
    import shutil

    from sertool.models import registry

    conf = tmp_path / "conf"
    shutil.copytree(registry.CONF_DIR, conf)
    monkeypatch.setattr(registry, "CONF_DIR", conf)
    monkeypatch.setattr(registry, "_DEFAULTS_READ", {})
    first = registry.default_config("probe")
    first["model"]["dropout"] = 0.9  # a caller's edit stays its own
    (conf / "probe.yaml").write_text(
        (conf / "probe.yaml").read_text().replace("  hidden: 0", "  hidden: 0\n  new_key: 1")
    )
    again = registry.default_config("probe")
    assert "new_key" not in again["model"] and again["model"]["dropout"] == 0.0
    m = build_model({"name": "probe", "input_dim": 4, "n_classes": 2})
    assert m.config["model"]["hidden"] == 0
