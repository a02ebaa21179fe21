"""Fidelity of :class:`brainjepa_fast.Encoder` against the original code path (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import brainjepa_fast as bj
from brainjepa_fast import model
from brainjepa_fast.config import ENCODER_TOLERANCE
from brainjepa_fast.model import cpu_attention
from brainjepa_fast.original import OriginalVisionTransformer
from brainjepa_fast.position import load_gradient, time_table
from helpers import rel_err, scratch_checkpoint

FIDELITY_TOL = 1e-5


def original_from_file(path, variant: str, img_size=(450, 160), component="target_encoder"):
    """Build the original model straight from the file (no brainjepa_fast loading code)."""
    flat = load_file(str(path))
    state = {}
    for key, value in flat.items():
        comp, _, name = key.partition(".")
        if comp == component:
            state[name[len("module."):] if name.startswith("module.") else name] = value
    gradient = torch.from_numpy(np.loadtxt(bj.position.default_gradient_path(), delimiter=",")).float()
    model = OriginalVisionTransformer(gradient, variant, img_size)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def base_ckpt_ddp(tmp_path_factory):
    with scratch_checkpoint(tmp_path_factory, "base_ddp.safetensors", seed=11, module_prefix=True,
                            perturb=0.02) as path:
        yield path


def test_vit_base_matches_original_full_size(base_ckpt_ddp):
    """Standard input (B=2, 450 x 160), checkpoint keys with DDP ``module.``: rel. error <= 1e-5."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 450, 160)
    ours = bj.load(base_ckpt_ddp, device="cpu")
    ref = original_from_file(base_ckpt_ddp, "vit_base")
    with torch.inference_mode():
        out = ours(x)
        expected = ref(x)
    assert out.shape == (2, 4500, 768)
    assert rel_err(out, expected) <= FIDELITY_TOL
    # the two samples differ: batching did not mix or repeat them
    assert rel_err(out[0], out[1]) > 0.1


@pytest.mark.parametrize("suffix", [".pth.tar", ".safetensors"])
def test_vit_small_matches_original_both_formats(tmp_path, suffix):
    path = bj.save_random_checkpoint(tmp_path / f"small{suffix}", seed=3, variant="vit_small", perturb=0.02)
    torch.manual_seed(1)
    x = torch.randn(3, 1, 450, 160)
    ours = bj.load(path, device="cpu")
    if suffix == ".safetensors":
        ref = original_from_file(path, "vit_small")
    else:
        obj = torch.load(path, weights_only=True)
        ref = OriginalVisionTransformer(load_gradient(), "vit_small")
        ref.load_state_dict(obj["target_encoder"])
    with torch.inference_mode():
        assert rel_err(ours(x), ref.eval()(x)) <= FIDELITY_TOL


def test_target_encoder_is_the_default_component(tmp_path):
    path = bj.save_random_checkpoint(tmp_path / "s.safetensors", seed=5, variant="vit_small")
    x = torch.randn(2, 1, 450, 32)
    with torch.inference_mode():
        target = bj.load(path, device="cpu")(x)
        online = bj.load(path, device="cpu", component="encoder")(x)
        ref = original_from_file(path, "vit_small", component="encoder")
    assert rel_err(target, online) > 1e-2
    ref_small = OriginalVisionTransformer(load_gradient(), "vit_small", (450, 32))
    full = ref.state_dict()
    full["pos_embed_proj.emb_h"] = ref_small.pos_embed_proj.emb_h  # original table for 2 patches
    ref_small.load_state_dict(full)
    with torch.inference_mode():
        assert rel_err(online, ref_small.eval()(x)) <= FIDELITY_TOL


def test_time_table_extends_stored_emb_h():
    """Longer scans: the analytic table equals the stored ``emb_h`` on the first 10 patches."""
    stored = time_table(450, 10, 384).view(450, 10, 384)
    longer = time_table(450, 30, 384).view(450, 30, 384)
    assert torch.equal(longer[:, :10], stored)
    orig = OriginalVisionTransformer(load_gradient(), "vit_small", (450, 480))
    assert torch.allclose(orig.pos_embed_proj.emb_h, time_table(450, 30, 192), atol=1e-6)


def test_long_scan_matches_original_built_for_that_length(tmp_path):
    """T=480 (30 patches): Encoder from a 160-frame checkpoint == original model built for 480."""
    path = bj.save_random_checkpoint(tmp_path / "s.safetensors", seed=8, variant="vit_small", perturb=0.02)
    ours = bj.load(path, device="cpu")
    ref = original_from_file(path, "vit_small")
    ref_long = OriginalVisionTransformer(load_gradient(), "vit_small", (450, 480))
    state = ref.state_dict()
    state["pos_embed_proj.emb_h"] = ref_long.pos_embed_proj.emb_h
    ref_long.load_state_dict(state)
    x = torch.randn(1, 1, 450, 480)
    with torch.inference_mode():
        assert rel_err(ours(x), ref_long.eval()(x)) <= FIDELITY_TOL


def test_from_module_converts_original(tmp_path):
    ref = OriginalVisionTransformer(load_gradient(), "vit_small")
    with torch.no_grad():  # a "fine-tuned" model: every parameter off its init
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc = bj.Encoder.from_module(ref.eval(), backend="torch")
    x = torch.randn(2, 1, 450, 160)
    with torch.inference_mode():
        assert rel_err(enc(x), ref(x)) <= FIDELITY_TOL


def test_state_dict_keys_match_original():
    ours = bj.Encoder("vit_base")
    ref = OriginalVisionTransformer(load_gradient(), "vit_base")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(ours.state_dict()) == 151


def test_bf16_torch_path_close_to_fp32(tmp_path):
    path = bj.save_random_checkpoint(tmp_path / "s.safetensors", seed=2, variant="vit_small", perturb=0.02)
    x = torch.randn(1, 450, 160)
    ref = bj.encode(x, bj.load(path, device="cpu"))
    out = bj.encode(x, bj.load(path, device="cpu", dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= ENCODER_TOLERANCE["torch", "bf16"]


@pytest.mark.parametrize("n,chunk", [(1, 512), (77, 32), (300, 300), (301, 64)])
def test_cpu_attention_equals_sdpa(n, chunk):
    """Chunked CPU attention on strided q/k/v views (as the packed qkv gives them), ragged N."""
    torch.manual_seed(n)
    qkv = torch.randn(2, n, 3, 3, 64, dtype=torch.float64).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    ref = F.scaled_dot_product_attention(*qkv)
    assert rel_err(cpu_attention(*qkv, chunk=chunk), ref) <= 1e-12
    bf16 = cpu_attention(*qkv.bfloat16(), chunk=chunk)
    assert bf16.dtype == torch.bfloat16 and rel_err(bf16, ref) <= 1e-2


def test_attention_routes_bf16_cpu_inference_only(monkeypatch):
    """bf16 CPU inference without AMX takes cpu_attention; autograd, fp32, fp16 and AMX CPUs keep SDPA."""
    calls = []
    monkeypatch.setattr(model, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(model, "cpu_attention", lambda *qkv: calls.append("cpu") or F.scaled_dot_product_attention(*qkv))
    attn = model.Attention(128, 2)
    x = torch.randn(1, 20, 128)
    for dtype, grad, expected in [(torch.bfloat16, False, ["cpu"]), (torch.bfloat16, True, []),
                                  (torch.float32, False, []), (torch.float16, False, [])]:
        calls.clear()
        with torch.set_grad_enabled(grad):
            attn.to(dtype)(x.to(dtype))
        assert calls == expected, (dtype, grad)
    monkeypatch.setattr(model, "cpu_has_amx", lambda: True)  # SDPA uses the AMX units: keep it
    calls.clear()
    with torch.no_grad():
        attn.to(torch.bfloat16)(x.bfloat16())
    assert calls == []


def test_gradient_table_stays_float32_after_cast():
    enc = bj.Encoder("vit_small").to(torch.bfloat16)
    assert enc.gradient.dtype == torch.float32
    assert torch.equal(enc.gradient, load_gradient())


def test_backend_resolution_on_cpu():
    enc = bj.Encoder("vit_small", backend="auto")
    assert enc.backend == "torch"
    assert "cpu" in enc.backend_reason
    with pytest.raises(bj.ConfigError, match="triton"):
        enc.set_backend("triton")
        enc.backend
    with pytest.raises(bj.ConfigError, match="unknown backend"):
        bj.Encoder("vit_small", backend="cuda")


def test_cpu_inference_mlp_in_row_chunks_equals_whole():
    """CPU inference runs the MLP half a few tokens at a time, in place: same result as the
    whole-sequence MLP (ragged last chunk), and autograd keeps the unchunked path."""
    torch.manual_seed(0)
    blk = model.Block(64, 4, 256)
    x = torch.randn(2, 77, 64)
    whole = x + blk.mlp(blk.norm2(x))
    with torch.no_grad():
        chunked = blk.mlp_in_row_chunks(x.clone(), rows=32)
    assert rel_err(chunked, whole) <= 1e-6
    with torch.no_grad():
        assert rel_err(blk(x), x + blk.attn(blk.norm1(x)) + blk.mlp(blk.norm2(x + blk.attn(blk.norm1(x))))) <= 1e-6
    out = blk(x.requires_grad_())
    out.sum().backward()  # the differentiable path: no in-place update of a tensor autograd needs
    assert x.grad is not None
