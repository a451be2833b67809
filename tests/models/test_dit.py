"""DiT: shapes, official state-dict layout, adaLN-Zero, CFG, and the block maths written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.dit import DiTBlock
from models.layers import TimestepEmbedder, get_2d_sincos_pos_embed

PAPER_CONFIGS = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def _inputs(batch=2, channels=4, size=32, num_classes=1000, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, t, y


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_output_shape_on_meta(name):
    with torch.device("meta"):
        model = build_model(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        out = model(*_inputs(device="meta"))
    assert out.shape == (2, 8, 32, 32)


def official_keys(depth: int) -> list[str]:
    """The key list of the official DiT checkpoints (facebookresearch/DiT models.py)."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias"]
    keys += [f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    keys += ["y_embedder.embedding_table.weight"]
    for n in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{n}.{layer}.weight", f"blocks.{n}.{layer}.bias"]
    keys += [f"final_layer.{layer}.{w}" for layer in ("linear", "adaLN_modulation.1") for w in ("weight", "bias")]
    return keys


def test_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = build_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                            class_dropout_prob=0.1)
    sd = model.state_dict()
    assert list(sd) == official_keys(28)
    # Shapes of DiT-XL-2-256x256.pt
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["t_embedder.mlp.0.weight"].shape == (1152, 256)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3456, 1152)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4608, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2304, 1152)


def test_checkpoint_round_trip_strict(tmp_path):
    a = build_model("DiT-XXS/2", input_size=16, in_channels=4, num_classes=10)
    for p in a.parameters():  # make every tensor non-trivial so the comparison means something
        torch.nn.init.normal_(p)
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b = build_model("DiT-XXS/2", input_size=16, in_channels=4, num_classes=10)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True)
    a.eval(), b.eval()
    x, t, y = _inputs(size=16, num_classes=10)
    assert torch.equal(a(x, t, y), b(x, t, y))


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", input_size=16, in_channels=4, num_classes=10)
    x = torch.randn(3, 64, 192)
    c = torch.randn(3, 192)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.count_nonzero(model(*_inputs(batch=3, size=16, num_classes=10))) == 0


def test_initialisation_follows_the_official_recipe():
    torch.manual_seed(0)
    model = build_model("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 1e-3
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 1e-3
    qkv = model.blocks[0].attn.qkv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (384 + 3 * 384))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert not model.pos_embed.requires_grad


def test_block_matches_hand_written_formulas():
    """x = x + α1·Attn(LN(x)(1+γ1)+β1); x = x + α2·MLP(LN(x)(1+γ2)+β2), with every sub-step spelled out."""
    torch.manual_seed(0)
    D, H, B, N = 32, 4, 2, 5
    block = DiTBlock(D, H).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)  # non-zero adaLN so every term is exercised
    x = torch.randn(B, N, D, dtype=torch.float64)
    c = torch.randn(B, D, dtype=torch.float64)

    def layer_norm(h):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-6)

    def linear(h, layer):
        return h @ layer.weight.T + layer.bias

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    mod = linear(c * torch.sigmoid(c), block.adaLN_modulation[1])
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i * D:(i + 1) * D, None].transpose(1, 2) for i in range(6))

    h = layer_norm(x) * (1 + scale1) + shift1
    q, k, v = linear(h, block.attn.qkv).split(D, dim=-1)
    heads = lambda z: z.reshape(B, N, H, D // H).transpose(1, 2)
    q, k, v = heads(q), heads(k), heads(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
    att = linear(att.transpose(1, 2).reshape(B, N, D), block.attn.proj)
    x1 = x + gate1 * att

    h = layer_norm(x1) * (1 + scale2) + shift2
    x2 = x1 + gate2 * linear(gelu_tanh(linear(h, block.mlp.fc1)), block.mlp.fc2)

    torch.testing.assert_close(block(x, c), x2, rtol=1e-10, atol=1e-10)


def test_cfg_with_null_label():
    torch.manual_seed(0)
    model = build_model("DiT-XXS/2", input_size=8, in_channels=4, num_classes=10, learn_sigma=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    x, t, y = _inputs(batch=2, size=8, num_classes=10)
    null = torch.full_like(y, 10)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)

    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0)
    expected_eps = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:2, :4], expected_eps)
    torch.testing.assert_close(out[2:, :4], expected_eps)
    torch.testing.assert_close(out[:2, 4:], cond[:, 4:])  # learned variance is not guided
    torch.testing.assert_close(model.forward_with_cfg(xx, tt, yy, 1.0)[:2], cond)

    official = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0, guide_channels=3)
    torch.testing.assert_close(official[:2, :3], expected_eps[:, :3])
    torch.testing.assert_close(official[:2, 3:], cond[:, 3:])  # the official code leaves channel 3 unguided


def test_label_dropout_uses_the_null_class():
    model = build_model("DiT-XXS/2", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=1.0)
    y = torch.arange(4)
    table = model.y_embedder.embedding_table.weight
    torch.testing.assert_close(model.y_embedder(y, train=True), table[10].expand(4, -1))
    torch.testing.assert_close(model.y_embedder(y, train=False), table[:4])
    forced = model.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(forced[0], table[10])
    torch.testing.assert_close(forced[1], table[1])


@pytest.mark.parametrize("channels,size,learn_sigma", [(1, 16, False), (3, 16, True), (16, 8, True), (4, (8, 16), True)])
def test_any_channels_and_sizes(channels, size, learn_sigma):
    model = build_model("DiT-XXS/4", input_size=size, in_channels=channels, num_classes=3, learn_sigma=learn_sigma)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, channels, h, w)
    out = model(x, torch.tensor([1, 500]), torch.tensor([0, 2]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), h, w)
    assert torch.isfinite(out).all()


def test_unpatchify_inverts_patchify():
    model = build_model("DiT-XXS/2", input_size=(4, 6), in_channels=2, num_classes=3, learn_sigma=False)
    img = torch.randn(1, 2, 4, 6)
    p = 2
    # Patch tokens in the layout the final linear produces: [B, N, p*p*C] with (p, q, c) order.
    tokens = img.reshape(1, 2, 2, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(1, 6, p * p * 2)
    torch.testing.assert_close(model.unpatchify(tokens), img)


def test_patch_must_divide_input():
    with pytest.raises(ValueError, match="does not divide"):
        build_model("DiT-XXS/4", input_size=10)


def test_sincos_tables_by_formula():
    D, grid = 16, 3
    pe = get_2d_sincos_pos_embed(D, grid)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    for i in range(grid):
        for j in range(grid):
            row = pe[i * grid + j]
            # first half encodes the column j, second half the row i; each half is [sin | cos]
            torch.testing.assert_close(row[: D // 4], torch.sin(j * omega))
            torch.testing.assert_close(row[D // 4: D // 2], torch.cos(j * omega))
            torch.testing.assert_close(row[D // 2: 3 * D // 4], torch.sin(i * omega))
            torch.testing.assert_close(row[3 * D // 4:], torch.cos(i * omega))

    t = torch.tensor([0.0, 7.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_sdpa_attention_matches_explicit_softmax():
    from models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(24, 3)
    x = torch.randn(2, 7, 24)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj((F.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_any_dit_geometry_parses_and_sizes_order_by_scale():
    """`DiT-d{depth}w{width}/p`: the CPU ladders of the embedded studies (head width 32)."""
    from analysis.runs import size_rank
    from models.registry import parse_model_name

    spec = parse_model_name("DiT-d3w96/2")
    assert (spec.family, spec.size, spec.depth, spec.hidden, spec.heads, spec.patch) == ("dit", "d3w96", 3, 96, 3, 2)
    model = build_model("DiT-d3w96/4", input_size=16, in_channels=3, num_classes=4)
    assert (len(model.blocks), model.blocks[0].attn.qkv.in_features) == (3, 96)
    for bad in ("DiT-d3w100/2", "DiT-d0w64/2", "DiT-d2w64/0", "DiT-d2w16/2"):
        with pytest.raises(ValueError, match="multiple of 32|positive"):
            parse_model_name(bad)
    ladder = ["XXS", "d2w64", "d3w96", "d4w128", "XS", "d6w192", "S", "XL"]
    ranks = [size_rank(s, "dit") for s in ladder]
    assert ranks == sorted(ranks) and ranks[0] == ranks[1], ranks  # XXS is d2w64's geometry
    assert size_rank("d3", "mmdit") < size_rank("d4", "mmdit") < size_rank("nonsense", "dit")
