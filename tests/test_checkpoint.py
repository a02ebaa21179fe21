"""Checkpoint layout, loading paths and every bad-checkpoint error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import brainjepa_fast as bj
from brainjepa_fast.checkpoint import random_state_dicts, read_component
from helpers import scratch_checkpoint


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    with scratch_checkpoint(tmp_path_factory, "small.safetensors", seed=0, variant="vit_small") as path:
        yield path


def test_published_layout_has_384_float32_tensors(tmp_path):
    path = bj.save_random_checkpoint(tmp_path / "base.safetensors", seed=1)
    flat = load_file(str(path))
    assert len(flat) == 384
    assert all(v.dtype == torch.float32 for v in flat.values())
    counts = {c: sum(k.startswith(c + ".") for k in flat) for c in ("encoder", "predictor", "target_encoder")}
    assert counts == {"encoder": 151, "predictor": 82, "target_encoder": 151}
    assert flat["target_encoder.pos_embed_proj.emb_h"].shape == (4500, 384)
    assert flat["predictor.predictor_2dpe_proj.emb_h"].shape == (4500, 192)
    assert flat["predictor.mask_token"].shape == (1, 1, 384)
    assert flat["target_encoder.pos_embed_proj.predictor_pos_embed_proj.weight"].shape == (384, 30)


def test_random_checkpoint_is_seeded_and_initialised_like_the_original():
    a = random_state_dicts(7, "vit_small")
    b = random_state_dicts(7, "vit_small")
    c = random_state_dicts(8, "vit_small")
    w = "blocks.3.attn.qkv.weight"
    assert torch.equal(a["target_encoder"][w], b["target_encoder"][w])
    assert not torch.equal(a["target_encoder"][w], c["target_encoder"][w])
    assert not torch.equal(a["target_encoder"][w], a["encoder"][w])
    assert abs(a["encoder"][w].std().item() - 0.02) < 1e-3
    assert torch.equal(a["encoder"]["blocks.0.norm1.weight"], torch.ones(384))
    assert torch.equal(a["encoder"]["blocks.0.mlp.fc1.bias"], torch.zeros(1536))


def test_module_prefix_is_stripped_in_both_formats(tmp_path):
    for name in ("m.safetensors", "m.pth.tar"):
        path = bj.save_random_checkpoint(tmp_path / name, seed=4, variant="vit_small", module_prefix=True)
        state = read_component(path)
        assert "blocks.0.attn.qkv.weight" in state and not any(k.startswith("module.") for k in state)


def test_pth_loads_with_weights_only_and_matches_safetensors(tmp_path):
    st = bj.save_random_checkpoint(tmp_path / "a.safetensors", seed=9, variant="vit_small")
    pth = bj.save_random_checkpoint(tmp_path / "a.pth.tar", seed=9, variant="vit_small")
    a, b = read_component(st), read_component(pth)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_describe_checkpoint(small_ckpt):
    info = bj.describe_checkpoint(small_ckpt)
    assert info["format"] == "safetensors" and info["total_tensors"] == 151 * 2 + 82
    assert info["components"]["target_encoder"]["variant"] == "vit_small"
    assert info["components"]["target_encoder"]["parameters"] == sum(
        p.numel() for p in bj.Encoder("vit_small").state_dict().values()
    )


def _rewrite(src, dst, edit):
    flat = load_file(str(src))
    edit(flat)
    save_file(flat, str(dst))
    return dst


def test_missing_key_is_named(small_ckpt, tmp_path):
    bad = _rewrite(small_ckpt, tmp_path / "bad.safetensors", lambda f: f.pop("target_encoder.blocks.2.norm1.bias"))
    with pytest.raises(bj.CheckpointError, match=r"bad\.safetensors.*1 missing: blocks\.2\.norm1\.bias"):
        bj.load(bad, device="cpu")


def test_misshapen_key_is_named_with_shapes(small_ckpt, tmp_path):
    def edit(f):
        f["target_encoder.blocks.0.mlp.fc1.weight"] = torch.randn(1000, 384)

    bad = _rewrite(small_ckpt, tmp_path / "bad.safetensors", edit)
    with pytest.raises(bj.CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight expected \[1536, 384\] got \[1000, 384\]"):
        bj.load(bad, device="cpu")


def test_unexpected_key_is_named(small_ckpt, tmp_path):
    def edit(f):
        f["target_encoder.cls_token"] = torch.randn(1, 1, 384)

    bad = _rewrite(small_ckpt, tmp_path / "bad.safetensors", edit)
    with pytest.raises(bj.CheckpointError, match=r"1 unexpected: cls_token"):
        bj.load(bad, device="cpu")


def test_nan_weights_are_rejected(small_ckpt, tmp_path):
    def edit(f):
        f["target_encoder.norm.weight"][3] = float("nan")

    bad = _rewrite(small_ckpt, tmp_path / "bad.safetensors", edit)
    with pytest.raises(bj.CheckpointError, match=r"NaN/Inf.*norm\.weight"):
        bj.load(bad, device="cpu")


def test_missing_component(small_ckpt, tmp_path):
    bad = _rewrite(small_ckpt, tmp_path / "enc_only.safetensors",
                   lambda f: [f.pop(k) for k in list(f) if k.startswith("target_encoder.")])
    with pytest.raises(bj.CheckpointError, match=r"enc_only\.safetensors: no 'target_encoder\.' tensors"):
        bj.load(bad, device="cpu")
    assert bj.load(bad, device="cpu", component="encoder").config.name == "vit_small"


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", None])
def test_corrupt_or_truncated_files(small_ckpt, tmp_path, content):
    for suffix in (".safetensors", ".pth.tar"):
        bad = tmp_path / f"bad{suffix}"
        if content is None:  # truncated copy of a real file
            data = small_ckpt.read_bytes() if suffix == ".safetensors" else None
            if data is None:
                bj.save_random_checkpoint(tmp_path / "ok.pth.tar", seed=1, variant="vit_small")
                data = (tmp_path / "ok.pth.tar").read_bytes()
            bad.write_bytes(data[: len(data) // 2])
        else:
            bad.write_bytes(content)
        with pytest.raises(bj.CheckpointError, match=f"bad{suffix}"):
            bj.load(bad, device="cpu")


def test_missing_file_and_bad_component(tmp_path, small_ckpt):
    with pytest.raises(bj.CheckpointError, match="nope.safetensors: checkpoint file not found"):
        bj.load(tmp_path / "nope.safetensors")
    with pytest.raises(bj.CheckpointError, match="predictor"):
        bj.load(small_ckpt, component="predictor")


def test_unknown_variant():
    with pytest.raises(bj.ConfigError, match="unknown variant 'vit_huge'"):
        bj.Encoder("vit_huge")
    with pytest.raises(bj.ConfigError, match="unknown variant"):
        bj.save_random_checkpoint("/tmp/never-written.safetensors", seed=0, variant="vit_tiny")


def test_gradient_table_of_wrong_shape(tmp_path, small_ckpt):
    bad = tmp_path / "grad.csv"
    bad.write_text("\n".join(",".join(["0.5"] * 30) for _ in range(400)))
    with pytest.raises(bj.ConfigError, match=r"grad\.csv: gradient table must be 450 x 30.*got 400 x 30"):
        bj.load(small_ckpt, gradient=bad, device="cpu")


def test_wrong_input_shapes(small_ckpt):
    enc = bj.load(small_ckpt, device="cpu")
    with pytest.raises(bj.ScanError, match="400 ROIs, expected 450"):
        bj.encode(torch.randn(400, 160), enc)
    with pytest.raises(bj.ScanError, match="T=150 frames, expected a positive multiple of 16"):
        bj.encode(torch.randn(450, 150), enc)
    x = torch.randn(450, 160)
    x[3, 7] = float("inf")
    with pytest.raises(bj.ScanError, match="1 NaN/Inf"):
        bj.encode(x, enc)
    with pytest.raises(bj.ScanError, match="input is on meta, the encoder on cpu"):
        enc(torch.empty(1, 1, 450, 160, device="meta"))
