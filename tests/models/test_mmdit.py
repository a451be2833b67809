"""MM-DiT: parity with diffusers' SD3Transformer2DModel, text masks, both attention variants, counts
(analytic vs. modules vs. PyTorch's flop counter), presets, SD3-medium's size, training, bench."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, list_presets, model_name, parse_model_name
from models.flops import count_model, mmdit_count
from models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")

# (diffusers config, input H x W): SD3 layout at tiny sizes. pos_embed_max_size crops (incl. non-square
# and other resolutions than sample_size); without it diffusers recomputes the table for other sizes.
PARITY = {
    "square": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                    pooled_projection_dim=12, out_channels=4, pos_embed_max_size=24), (16, 16)),
    "qknorm-nonsquare": (dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                              pooled_projection_dim=12, out_channels=4, pos_embed_max_size=24,
                              qk_norm="rms_norm"), (12, 20)),
    "qknorm-depth1-patch4": (dict(sample_size=16, patch_size=4, in_channels=3, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=10, caption_projection_dim=16,
                                  pooled_projection_dim=6, out_channels=3, pos_embed_max_size=8,
                                  qk_norm="rms_norm"), (32, 16)),
    "nomax-native": (dict(sample_size=8, patch_size=2, in_channels=3, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=10, caption_projection_dim=16,
                          pooled_projection_dim=6, out_channels=5, pos_embed_max_size=None), (8, 8)),
    "nomax-other-size": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=10, caption_projection_dim=16,
                              pooled_projection_dim=6, out_channels=4, pos_embed_max_size=None), (12, 8)),
}


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised adaLN/output layers would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _text(batch, tokens, width, pooled_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, width, generator=g), torch.randn(batch, pooled_dim, generator=g)


@pytest.mark.parametrize("case", PARITY)
def test_matches_diffusers_sd3(case):
    cfg, (H, W) = PARITY[case]
    torch.manual_seed(0)
    ref = _randomize(diffusers.SD3Transformer2DModel(**cfg)).eval()
    ours = MMDiT.from_diffusers(ref).eval()
    again = MMDiT.from_diffusers(state_dict=ref.state_dict(), config=dict(ref.config)).eval()
    B = 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, cfg["in_channels"], H, W, generator=g)
    t = torch.tensor([3.0, 871.5])  # diffusers' timestep scale, 0..1000
    context, pooled = _text(B, 7, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, context, pooled)
        got2 = again(x, t, context, pooled)
    assert got.shape == expected.shape == (B, cfg["out_channels"], H, W)
    err = (got - expected).abs().max().item()
    print(f"parity {case}: max abs error {err:.2e} (output scale {expected.abs().max().item():.2f})")
    assert err < 1e-4
    assert (got2 - expected).abs().max().item() < 1e-4
    # fused QKV per stream in our layout
    sd = ours.state_dict()
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert sd["blocks.0.x_block.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.0.context_block.attn.qkv.weight"].shape == (3 * D, D)


def test_from_diffusers_rejects_dual_attention():
    cfg = dict(PARITY["square"][0], dual_attention_layers=(0,))
    ref = diffusers.SD3Transformer2DModel(**cfg)
    with pytest.raises(ValueError, match="dual"):
        MMDiT.from_diffusers(ref)


def _tiny(attention="joint", qk_norm=None, **kw):
    kw = {"input_size": 8, "in_channels": 4, "context_dim": 12, "pooled_dim": 6, **kw}
    return build_model("MMDiT-d2/2", attention=attention, qk_norm=qk_norm, **kw)


@pytest.mark.parametrize("attention", ["joint", "split"])
@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_padding_tokens_never_change_the_image_stream(attention, qk_norm):
    torch.manual_seed(0)
    model = _randomize(_tiny(attention, qk_norm), std=0.1).eval()
    B, real = 3, [5, 2, 1]
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([10.0, 500.0, 999.0])
    context, pooled = _text(B, 9, 12, 6)
    mask = torch.zeros(B, 9, dtype=torch.bool)
    for i, n in enumerate(real):
        mask[i, :n] = True
    junk = torch.where(mask[..., None], context, 5 * torch.randn_like(context))
    with torch.no_grad():
        out = model(x, t, context, pooled, mask)
        out_junk = model(x, t, junk, pooled, mask)
        # each sample alone with only its real tokens and no mask at all
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], context[i:i + 1, :n], pooled[i:i + 1])
                           for i, n in enumerate(real)])
        unmasked = model(x, t, junk, pooled)
    torch.testing.assert_close(out_junk, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    assert (unmasked - out).abs().max() > 1e-3  # without the mask, padding would leak in


def test_mask_reaches_sdpa_as_key_mask():
    masks = MMDiT.attention_masks(torch.tensor([[True, False], [False, False]]), n_img=3, attention="joint")
    keys = masks["joint"]
    assert keys.shape == (2, 1, 1, 5) and keys.dtype == torch.bool
    assert keys[0, 0, 0].tolist() == [True, True, True, True, False]
    assert keys[1, 0, 0].all()  # no real token at all: attend to everything rather than nothing
    split = MMDiT.attention_masks(torch.tensor([[True, False]]), n_img=3, attention="split")
    assert split["joint"] is None and split["text"].shape == (1, 1, 1, 2)


def test_null_condition():
    model = _tiny()
    cond = {"context": torch.randn(2, 5, 12), "pooled": torch.randn(2, 6), "context_mask": torch.ones(2, 5).bool()}
    null = model.null_condition(cond)
    assert null["context"].shape == (2, 5, 12) and not null["context"].any()
    assert null["pooled"].shape == (2, 6) and not null["pooled"].any()
    assert null["context_mask"] is cond["context_mask"]
    assert "context_mask" not in model.null_condition({"context": cond["context"], "pooled": cond["pooled"]})
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, **null)  # called as model(x_t, t, **cond)
    assert out.shape == (2, 4, 8, 8)


def test_caption_dropout_uses_the_null_condition():
    torch.manual_seed(0)
    model = _randomize(_tiny(class_dropout_prob=1.0), std=0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 700.0])
    context, pooled = _text(2, 5, 12, 6)
    null = model.null_condition({"context": context, "pooled": pooled})
    with torch.no_grad():
        dropped = model.train()(x, t, context, pooled)
        model.eval()
        torch.testing.assert_close(dropped, model(x, t, **null))
        assert (model(x, t, context, pooled) - dropped).abs().max() > 1e-3  # eval keeps the caption


def test_structure_of_both_variants():
    D = 128
    joint, split = _tiny("joint"), _tiny("split", "rms_norm")
    assert joint.blocks[0].x_block.adaLN_modulation[1].out_features == 6 * D
    last = joint.blocks[-1].context_block  # SD3's pre-only text stream: (shift, scale), no proj, no MLP
    assert last.adaLN_modulation[1].out_features == 2 * D and last.attn.proj is None and not hasattr(last, "mlp")
    for stream in (split.blocks[0].x_block, split.blocks[0].context_block, split.blocks[1].x_block):
        assert stream.adaLN_modulation[1].out_features == 9 * D  # shift/scale/gate x self, cross, FFN
        assert stream.attn.ln_q is not None and stream.attn.ln_k is not None
    assert split.blocks[0].x_block.cross_attn.qkv.out_features == 3 * D
    # last block: text gives K/V to the image's cross-attention (and no longer queries the image)
    last = split.blocks[-1].context_block
    assert last.adaLN_modulation[1].out_features == 5 * D
    assert last.cross_attn.proj is None and not hasattr(last, "mlp") and last.cross_attn.kv.out_features == 2 * D
    assert split.blocks[-1].x_block.cross_attn.q.out_features == D


@pytest.mark.parametrize("attention", ["joint", "split"])
def test_every_parameter_gets_a_gradient(attention):
    """No unused parameters (DDP/ZeRO would stall on them); only pooled-text inputs vary per sample."""
    torch.manual_seed(0)
    model = _randomize(_tiny(attention, "rms_norm"), std=0.1).train()
    context, pooled = _text(2, 5, 12, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    model(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 400.0]), context, pooled, mask).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("attention", ["joint", "split"])
def test_resolutions_with_pos_embed_max_size(attention):
    model = _tiny(attention, input_size=8, pos_embed_max_size=8)
    assert model.pos_embed.shape == (1, 64, 128)
    for H, W in ((8, 8), (16, 4), (4, 12), (16, 16)):
        out = model(torch.randn(1, 4, H, W), torch.tensor([5]), *_text(1, 3, 12, 6))
        assert out.shape == (1, 4, H, W)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(torch.randn(1, 4, 18, 8), torch.tensor([5]), *_text(1, 3, 12, 6))
    # the native grid sits at the centre of the table
    torch.testing.assert_close(model.position_embedding(8, 8), model.position_embedding(8, 8))
    centre = model.pos_embed.view(8, 8, -1)[2:6, 2:6].reshape(1, 16, -1)
    torch.testing.assert_close(model.position_embedding(4, 4), centre)


def test_learn_sigma_and_timestep_types():
    model = _tiny(learn_sigma=True)
    context, pooled = _text(2, 3, 12, 6)
    x = torch.randn(2, 4, 8, 8)
    assert model(x, torch.tensor([0, 999]), context, pooled).shape == (2, 8, 8, 8)
    assert model(x, torch.tensor([0.25, 999.5]), context, pooled).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError):
        _tiny(attention="cross")
    with pytest.raises(ValueError):
        _tiny(qk_norm="layer_norm")


# ------------------------------------------------------------------------------------ registry and counts


def test_names_and_presets():
    assert model_name("mmdit", "d4", 2) == "MMDiT-d4/2" == model_name("mmdit", 4, 2)
    spec = parse_model_name("MMDiT-d24/2")
    assert (spec.family, spec.size, spec.depth, spec.hidden, spec.heads) == ("mmdit", "d24", 24, 1536, 24)
    presets = list_presets()
    for name in ("MMDiT-d2/2", "MMDiT-d4/2", "MMDiT-d24/2", "MMDiT-d38/2", "DiT-XL/2"):
        assert name in presets
    for bad in ("MMDiT-24/2", "MMDiT-d0/2", "MMDiT-d4/0"):
        with pytest.raises(ValueError):
            parse_model_name(bad)
    model = build_model("MMDiT-d4/2", input_size=16, in_channels=4, context_dim=32, pooled_dim=16,
                        attention="split", qk_norm="rms_norm")
    assert (model.depth, model.hidden_size, model.num_heads, model.attention) == (4, 256, 4, "split")


SD3_MEDIUM = dict(input_size=128, in_channels=16, context_dim=4096, pooled_dim=2048, pos_embed_max_size=192)
SD3_MEDIUM_PARAMS = 2_028_328_000


def test_sd3_medium_parameter_count():
    from harness.bench.model_table import model_rows

    with torch.device("meta"):
        ours = build_model("MMDiT-d24/2", **SD3_MEDIUM)
        ref = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == SD3_MEDIUM_PARAMS  # "2B": 2.03 B
    assert ours.pos_embed.shape == ref.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)  # buffers, not params
    assert mmdit_count("MMDiT-d24/2", input_size=128, in_channels=16).params == SD3_MEDIUM_PARAMS
    # `ditscale models --json --input-size 128 --channels 16`: the MMDiT-d24/2 joint row is SD3-medium
    rows = [r for r in model_rows(input_size=128, channels=16) if r["name"] == "MMDiT-d24/2"]
    assert {r["attention"] for r in rows} == {"joint", "split"}
    joint = next(r for r in rows if r["attention"] == "joint")
    assert joint["params"] == SD3_MEDIUM_PARAMS and joint["context_dim"] == 4096 and joint["text_tokens"] == 154


def test_models_cli_lists_mmdit_rows():
    from harness.bench.model_table import model_rows

    rows = model_rows(input_size=32, channels=4)
    mm = [r for r in rows if r["family"] == "mmdit"]
    assert {(r["name"], r["attention"]) for r in mm} >= {("MMDiT-d2/2", "joint"), ("MMDiT-d2/2", "split"),
                                                          ("MMDiT-d24/2", "joint"), ("MMDiT-d38/8", "split")}
    assert all(r["params"] > 0 and r["gflops"] > 0 for r in mm)
    json.dumps(rows)


@pytest.mark.parametrize("attention", ["joint", "split"])
@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("depth", [1, 3])
def test_analytic_counts_match_module_and_flop_counter(attention, qk_norm, depth):
    name, size, channels, tokens = f"MMDiT-d{depth}/2", 8, 3, 5
    kw = dict(attention=attention, qk_norm=qk_norm, context_dim=24, pooled_dim=10)
    model = build_model(name, input_size=size, in_channels=channels, **kw)
    count = count_model(name, size, channels, text_tokens=tokens, **kw)
    assert count.params == count.trainable_params == sum(p.numel() for p in model.parameters())
    batch = 2
    x, t = torch.randn(batch, channels, size, size), torch.rand(batch) * 1000
    context, pooled = _text(batch, tokens, 24, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    # The math backend decomposes attention into matmuls the counter sees. Hardware FLOPs = 2 x MACs.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, context, pooled, mask)
    assert counter.get_total_flops() == pytest.approx(2 * batch * count.gflops * 1e9, rel=1e-9)


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("attention", ["joint", "split"])
def test_loss_halves_on_a_fixed_batch(attention):
    """Rectified-flow velocity target on one fixed tiny batch: 100 AdamW steps at least halve the MSE."""
    torch.manual_seed(0)
    model = build_model("MMDiT-d2/2", input_size=8, in_channels=4, context_dim=12, pooled_dim=6,
                        attention=attention, qk_norm="rms_norm").train()
    B = 8
    x0, noise = torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8)
    sigma = torch.rand(B)
    x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    target = noise - x0
    context, pooled = _text(B, 6, 12, 6)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[::2, 4:] = False
    cond = {"context": context, "pooled": pooled, "context_mask": mask}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(x_t, sigma * 1000, **cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{attention}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 100 AdamW steps")
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_word_encoder_conditions_the_model_end_to_end():
    from models.text import WordEncoder

    torch.manual_seed(0)
    enc = WordEncoder.from_captions(["a red cube", "a blue ball"], dim=16, max_length=5, layers=1)
    model = build_model("MMDiT-d2/2", input_size=8, in_channels=4, context_dim=enc.token_dim,
                        pooled_dim=enc.pooled_dim)
    _randomize(model, std=0.1)
    emb = enc.encode(["a red cube", "a blue ball"])
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0]), **emb.as_cond())
    out.square().mean().backward()
    assert enc.embed.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ bench


def test_bench_runs_ours_and_diffusers_sd3(capsys):
    from harness.bench.step_time import run_bench

    report = run_bench("MMDiT-d2/2", batch=1, steps=1, warmup=0, input_size=8, channels=4, device="cpu",
                       as_json=True)
    labels = [r["label"] for r in report["results"]]
    assert labels == ["ditscale MMDiT-d2/2 (joint)", "diffusers SD3Transformer2DModel"]
    assert report["step_time_ratio_vs_reference"] > 0
    assert json.loads(capsys.readouterr().out)["model"] == "MMDiT-d2/2"
