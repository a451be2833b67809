"""Analytic parameter and FLOP counts against the DiT paper and against PyTorch's own counters."""

import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import build_model
from models.flops import count_model, dit_count, latent_geometry, training_gflops
from tests.support.dit_paper import PAPER_GFLOPS  # DiT paper, Table 4 (also test_cli's)
from tests.support.paths import EXPERIMENTS


@pytest.mark.parametrize("short,paper", PAPER_GFLOPS.items())
def test_reproduces_paper_table(short, paper):
    size, channels = latent_geometry(256)
    got = dit_count(f"DiT-{short}", input_size=size, in_channels=channels).gflops
    assert abs(got - paper) <= max(0.011, 5e-4 * paper), (short, got, paper)


def test_xl2_parameter_count():
    assert abs(dit_count("DiT-XL/2").params / 1e6 - 675.1) < 0.05


@pytest.mark.parametrize("short", PAPER_GFLOPS)
def test_parameter_count_matches_the_module(short):
    name = f"DiT-{short}"
    with torch.device("meta"):
        model = build_model(name, input_size=32, in_channels=4, num_classes=1000)
    count = dit_count(name, input_size=32, in_channels=4)
    assert count.params == sum(p.numel() for p in model.parameters())
    assert count.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,size,channels,learn_sigma", [("DiT-XXS/2", 16, 4, True), ("DiT-XS/4", 16, 1, False)])
def test_flop_count_matches_torch_flop_counter(name, size, channels, learn_sigma):
    model = build_model(name, input_size=size, in_channels=channels, num_classes=10, learn_sigma=learn_sigma)
    batch = 3
    x = torch.randn(batch, channels, size, size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    # The math backend decomposes attention into matmuls the counter sees (the fused CPU kernel is not registered).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    analytic = count_model(name, size, channels, num_classes=10, learn_sigma=learn_sigma).gflops
    assert counter.get_total_flops() == pytest.approx(2 * batch * analytic * 1e9, rel=1e-9)


def test_training_compute_convention():
    assert training_gflops(2.0, 1000) == 6000.0
    with pytest.raises(ValueError):
        latent_geometry(100)


def test_the_model_section_is_one_spec_for_the_builder_the_counter_and_the_name():
    """A study's model section gives one typed spec (harness/schema.py ModelConfig.spec()): its name is printed
    from it, the FLOP counter and the builder read it, and a typed name parses to the same spec."""
    from harness.config import ModelConfig
    from models.registry import parse_model_name

    spec = ModelConfig(family="mmdit", size="4", patch=2, attention="split", qk_norm="rms_norm").spec()
    assert (spec.name, spec.depth, spec.hidden, spec.heads, spec.attention) == ("MMDiT-d4/2", 4, 256, 4, "split")
    kw = {"input_size": 8, "in_channels": 4, "text_tokens": 5, "context_dim": 24, "pooled_dim": 10}
    by_name = count_model("MMDiT-d4/2", attention="split", qk_norm="rms_norm", **kw)
    assert count_model(spec, **kw) == by_name != count_model("MMDiT-d4/2", **kw)  # the variant counts
    with pytest.raises(TypeError, match="carries attention"):
        count_model(spec, attention="joint", **kw)  # one source of the variant
    with torch.device("meta"):
        model = build_model(spec, input_size=8, in_channels=4, context_dim=24, pooled_dim=10)
    assert model.attention == "split" and sum(p.numel() for p in model.parameters()) == by_name.params
    assert ModelConfig(size="d2w64", patch=4).spec() == parse_model_name("DiT-d2w64/4")


def test_counting_a_study_needs_no_torch(tmp_path):
    """Budgets and the plan count FLOPs from the spec alone: `load_trials` on a train.flops study imports no
    torch (before #28 it built the model's info through a torch-importing module)."""

    study = EXPERIMENTS / "isoflop_smoke.yaml"
    code = ("import sys\nfrom harness.study import load_trials, planned_count\n"
            f"trials = load_trials({str(study)!r}, check_files=False).trials\n"
            "assert all(t.train.flops and t.train.steps for t in trials)\n"
            "print(len(trials), planned_count(trials[0]).count.gflops, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    count, gflops, torch_loaded = out.stdout.split()
    assert int(count) > 1 and float(gflops) > 0 and torch_loaded == "False", out.stdout
