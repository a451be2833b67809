"""muP (models/mup.py): the coordinate check across widths, sp untouched, every parameter's role, and
the per-role learning rates reaching DeepSpeed's optimizer under ZeRO-2 and ZeRO-3 on two ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from models.dit import DiT
from models.mup import apply_mup, lr_multipliers, parameter_roles

WIDTHS = (64, 128, 256, 512)  # x8
BASE = 64
LAYERS = ("x_embedder", "block0", "block1", "final")


def _dit(width: int, parametrization: str, base: int = BASE) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=width, depth=2, num_heads=width // 32,
                num_classes=10, learn_sigma=False, class_dropout_prob=0.0)
    if parametrization == "mup":
        apply_mup(model, base)
    return model


def _adam(model: DiT, parametrization: str, lr: float) -> torch.optim.Adam:
    if parametrization == "sp":
        return torch.optim.Adam(model.parameters(), lr=lr)
    factors, groups = lr_multipliers(model, BASE), {}
    for name, p in model.named_parameters():
        groups.setdefault(factors[name], []).append(p)
    return torch.optim.Adam([{"params": ps, "lr": lr * f} for f, ps in groups.items()])


def coordinate_check(parametrization: str, steps: int = 5, lr: float = 3e-3) -> dict[int, dict[str, float]]:
    """Per width, per layer: RMS of the change of the layer's output after `steps` Adam steps on a
    fixed batch (Yang et al.'s coordinate check: flat across widths under muP)."""
    out = {}
    for width in WIDTHS:
        model = _dit(width, parametrization)
        opt = _adam(model, parametrization, lr)
        g = torch.Generator().manual_seed(1)
        x, target = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
        t, y = torch.randint(0, 1000, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
        acts = {}
        modules = {"x_embedder": model.x_embedder, "block0": model.blocks[0], "block1": model.blocks[1],
                   "final": model.final_layer}
        for name, module in modules.items():
            module.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
        model(x, t, y)
        initial = dict(acts)
        for _ in range(steps):
            opt.zero_grad()
            ((model(x, t, y) - target) ** 2).mean().backward()
            opt.step()
        model(x, t, y)
        out[width] = {k: (acts[k] - initial[k]).pow(2).mean().sqrt().item() for k in LAYERS}
    return out


def test_coordinate_check_flat_under_mup_growing_under_sp(tmp_path):
    mup, sp = coordinate_check("mup"), coordinate_check("sp")
    lines = ["width " + " ".join(f"{k:>10}" for k in LAYERS)]
    for name, table in (("mup", mup), ("sp", sp)):
        lines += [f"{name} {w:>4} " + " ".join(f"{table[w][k]:>10.4f}" for k in LAYERS) for w in WIDTHS]
    (tmp_path / "coord_check.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    for layer in LAYERS:
        values = [mup[w][layer] for w in WIDTHS]
        assert max(values) / min(values) < 1.5, f"mup: {layer} changes with width: {values}"
    # (sp's output layer is erratic at the widest width, where sp training is unstable: the blocks show it)
    for layer in ("block0", "block1"):
        assert sp[512][layer] / sp[64][layer] > 3, f"sp: {layer} should grow with width: {[sp[w][layer] for w in WIDTHS]}"


def _geometry(name: str, depth: int | None = None, **kwargs) -> torch.nn.Module:
    """The preset's width and heads (what muP depends on) at `depth` blocks (default the preset's)."""
    from models.dit import DiT
    from models.mmdit import MMDiT
    from models.registry import parse_model_name

    spec = parse_model_name(name)
    cls, extra = (DiT, {"num_classes": 10}) if spec.family == "dit" else (MMDiT, {"context_dim": 24, "pooled_dim": 16})
    return cls(input_size=8, patch_size=spec.patch, in_channels=4, hidden_size=spec.hidden, depth=depth or spec.depth,
               num_heads=spec.heads, **extra, **kwargs)


def _sp_and_mup_at_base(name: str, depth: int | None = None, **kwargs):
    torch.manual_seed(0)
    sp = _geometry(name, depth, **kwargs)
    torch.manual_seed(0)
    mup = _geometry(name, depth, **kwargs)
    apply_mup(mup, mup.x_embedder.proj.weight.shape[0])
    return sp.eval(), mup.eval()  # eval: no random label dropout to tell them apart


# Every geometry a study can name: the registry's presets, and the DiT-d{D}w{W} ladders of experiments/.
LADDER = [f"DiT-{s}/4" for s in ("d1w32", "d1w64", "d2w64", "d2w96", "d3w96", "d4w128", "d6w192")]
MMDIT_VARIANTS = ({"attention": "joint"}, {"attention": "split"}, {"attention": "joint", "qk_norm": "rms_norm"})


def test_mup_at_its_base_width_is_sp_for_every_preset():
    """At w = base muP is sp for every preset geometry (DiT-XL/2 and MMDiT-d38/2 included, built
    without memory on the meta device; two blocks, as every block is alike, and one patch size, as the
    patch changes only the input layer's fan-in): the same attention scale in every module, LRs x1."""
    from models.registry import list_presets

    geometries = {name.split("/")[0]: name for name in list_presets() + LADDER}.values()
    for name in geometries:
        for variant in (MMDIT_VARIANTS if name.startswith("MMDiT") else ({},)):
            with torch.device("meta"):
                sp, mup = _sp_and_mup_at_base(name, depth=2, **variant)
            scales = [(n, getattr(m, "scale", None)) for n, m in sp.named_modules() if hasattr(m, "head_dim")]
            assert scales and scales == [(n, getattr(m, "scale", None)) for n, m in mup.named_modules()
                                         if hasattr(m, "head_dim")], (name, variant)
            assert set(lr_multipliers(mup, sp.x_embedder.proj.weight.shape[0]).values()) == {1.0}, name


# Real weights and outputs for the small geometries, each head width of the table (32, 64 and XL's 72,
# at one block), each family and MM-DiT attention variant; the larger ones differ only in width.
FORWARD_GEOMETRIES = ["DiT-XXS/2", "DiT-XS/2", "DiT-S/2", "DiT-XL/2"] + LADDER + ["MMDiT-d2/2", "MMDiT-d4/2"]


@pytest.mark.parametrize("name", FORWARD_GEOMETRIES)
def test_mup_at_its_base_width_gives_sp_outputs_bit_for_bit(name):
    """Same seed, base width: identical weights, and identical outputs (torch.equal) once every weight
    is random (at initialisation adaLN-Zero makes both outputs 0, which would hide the attention)."""
    depth = 1 if name == "DiT-XL/2" else 2
    for variant in (MMDIT_VARIANTS if name.startswith("MMDiT") else ({},)):
        sp, mup = _sp_and_mup_at_base(name, depth, **variant)
        for (key, a), (_, b) in zip(sp.state_dict().items(), mup.state_dict().items()):
            assert torch.equal(a, b), (name, key)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for (_, a), (_, b) in zip(sp.named_parameters(), mup.named_parameters()):
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
                b.copy_(a)
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3.0, 500.0, 999.0])
        if name.startswith("MMDiT"):
            cond = {"context": torch.randn(3, 5, 24, generator=g), "pooled": torch.randn(3, 16, generator=g),
                    "context_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])}
            out_sp, out_mup = sp(x, t, **cond), mup(x, t, **cond)
        else:
            y = torch.tensor([1, 2, 10])
            out_sp, out_mup = sp(x, t, y), mup(x, t, y)
        assert out_sp.abs().max() > 0.01, name  # the comparison sees the attention
        assert torch.equal(out_sp, out_mup), (name, variant, (out_sp - out_mup).abs().max().item())


def test_widening_heads_scale_as_one_over_d_from_sp_at_the_base():
    """Heads of a fixed count widen with the width: sp's 1/sqrt(d) at the base width, 1/d beyond
    (sqrt(d_b) / d); fixed-width heads keep sp's scale at every width."""
    from models.mup import attention_scale

    assert attention_scale(32, None) is None and attention_scale(32, 32) is None
    assert attention_scale(64, 32) == pytest.approx(32**0.5 / 64) and attention_scale(128, 32) == pytest.approx(32**0.5 / 128)
    for width, expected in ((64, None), (256, 32**0.5 / 128)):
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=width, depth=2, num_heads=2, num_classes=10)
        apply_mup(model, 64, base_head_dim=32)
        assert all(b.attn.scale == (pytest.approx(expected) if expected else None) for b in model.blocks), width


def test_every_parameter_has_its_role():
    from models import build_model

    dit = build_model("DiT-XXS/2", input_size=16, in_channels=1, num_classes=10)
    roles = parameter_roles(dit)
    assert set(roles) == {n for n, _ in dit.named_parameters()} and set(roles.values()) <= {"input", "hidden", "output", "vector"}
    assert roles["x_embedder.proj.weight"] == roles["y_embedder.embedding_table.weight"] == "input"
    assert roles["t_embedder.mlp.0.weight"] == "input" and roles["t_embedder.mlp.2.weight"] == "hidden"
    assert roles["blocks.0.attn.qkv.weight"] == roles["blocks.0.adaLN_modulation.1.weight"] == "hidden"
    assert roles["final_layer.linear.weight"] == "output" and roles["final_layer.linear.bias"] == "vector"
    mmdit = build_model("MMDiT-d2/2", input_size=16, in_channels=1, context_dim=32, pooled_dim=16)
    roles = parameter_roles(mmdit)
    assert roles["context_embedder.weight"] == roles["y_embedder.mlp.0.weight"] == "input"
    assert roles["blocks.0.context_block.attn.qkv.weight"] == "hidden"
    factors = lr_multipliers(mmdit, 64)  # d2: width 128 = 2 x 64
    assert factors["blocks.1.x_block.mlp.fc1.weight"] == 0.5 and factors["context_embedder.weight"] == 1.0
    apply_mup(mmdit, 64)  # 64-wide heads, more of them as MM-DiT widens: sp's attention scale
    assert all(b.x_block.attn.scale is None for b in mmdit.blocks)


_RANKS_SCRIPT = """
import json, sys
import torch
from harness.config import TrialConfig
from harness.trial.build import build_trial
from harness.common.process_group import setup_distributed
from harness.trial.engine import build_engine
from models.mup import lr_multipliers

trial = TrialConfig.model_validate(json.loads(open(sys.argv[1]).read()))
dist = setup_distributed(use_gpu=False)
torch.manual_seed(0)
built = build_trial(trial, dist.device)
factors = lr_multipliers(built.denoiser, trial.model.mup_base_width)
engine, optimizer, scheduler = build_engine(built.denoiser, trial, dist.world_size)
lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
expected = sorted({round(trial.train.lr * f, 12) for f in factors.values()})
assert lrs == expected, (lrs, expected)
if dist.rank == 0:
    print("MUP-LRS", json.dumps(lrs))
# An orderly exit: without it a rank can leave while gloo's threads still serve its peer, and the
# peer aborts at exit ("terminate called without an active exception", seen once in CI).
torch.distributed.barrier()
engine.destroy()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_per_role_learning_rates_reach_deepspeed_on_two_ranks(tmp_path, digits_dir, stage):
    from harness.config import expand_grid, load_study
    from tests.support import ROOT, tiny_study, write_study

    study = tiny_study(digits_dir, f"mup{stage}", model={"parametrization": "mup", "mup_base_width": 32},
                       train={"zero_stage": stage, "lr": 1e-3}, resources={"workers_per_trial": 2})
    (trial,) = expand_grid(load_study(write_study(tmp_path / "s.yaml", study)))
    (tmp_path / "trial.json").write_text(trial.model_dump_json())
    (tmp_path / "ranks.py").write_text(_RANKS_SCRIPT)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(tmp_path / "ranks.py"), str(tmp_path / "trial.json")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MUP-LRS"))
    assert line.split(" ", 1)[1] == "[0.0005, 0.001]"  # DiT-XXS is 64 wide: hidden and output at lr / 2
