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


def test_mup_at_its_base_width_is_sp():
    """At w = base (64-wide heads) muP changes nothing: same weights, learning rates x1, same outputs."""
    sp, mup = _dit(128, "sp"), _dit(128, "mup", base=128)
    for (name, a), (_, b) in zip(sp.state_dict().items(), mup.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(lr_multipliers(mup, 128).values()) == {1.0}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    torch.testing.assert_close(sp(x, t, y), mup(x, t, y), rtol=1e-6, atol=1e-6)


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
    apply_mup(mmdit, 64)
    assert all(b.x_block.attn.scale == 8 / 64 for b in mmdit.blocks)


_RANKS_SCRIPT = """
import json, sys
import torch
from harness.config import TrialConfig
from harness.trial.build import build_trial
from harness.trial.distributed import setup_distributed
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
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_per_role_learning_rates_reach_deepspeed_on_two_ranks(tmp_path, digits_dir, stage):
    from harness.config import expand_grid, load_study
    from tests.conftest import ROOT, tiny_study, write_study

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
