"""EMA of the weights: decay and warm-up maths, fp32 shadow for bf16 models, checkpoints, swapping the
averaged weights in for evaluation, and the `gather` hook for ZeRO-3-partitioned parameters."""

import io
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from models import build_model
from models.ema import EMA, update_together
from models.phema import PowerFunctionEMA
from tests.support.paths import ROOT


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).to(dtype)


def _set_all(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_update_is_the_exponential_moving_average():
    model = _net()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    _set_all(model, 2.0)
    for k in range(1, 4):
        assert ema.update(model) == 0.9
        for name, value in start.items():
            # constant target 2: shadow_k = 2 + 0.9^k (shadow_0 - 2)
            torch.testing.assert_close(ema.shadow[name], 2.0 + 0.9**k * (value - 2.0))
    assert ema.num_updates == 3


def test_warmup_decay():
    model = _net()
    ema = EMA(model, decay=0.9999, warmup=True)
    assert [ema.decay_at(n) for n in (0, 1, 2, 90)] == pytest.approx([0.1, 2 / 11, 3 / 12, 91 / 100])
    assert ema.decay_at(10**6) == 0.9999  # capped by the configured decay
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_all(model, 1.0)
    assert ema.update(model) == pytest.approx(0.1)
    for name, value in start.items():
        torch.testing.assert_close(ema.shadow[name], 0.1 * value + 0.9)
    assert EMA(model, decay=0.9999).decay_at(0) == 0.9999  # no warm-up unless asked
    with pytest.raises(ValueError):
        EMA(model, decay=1.5)


def test_shadow_stays_fp32_for_a_bf16_model():
    model = _net(dtype=torch.bfloat16)
    _set_all(model, 1.0)
    ema = EMA(model, decay=0.999)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    # 1.0078125 is the next bf16 value after 1: one update moves the average by 7.8e-6, which only fp32 holds.
    _set_all(model, 1.0078125)
    ema.update(model)
    for s in ema.shadow.values():
        assert (s == 1.0 + 0.001 * 0.0078125).all()
    # Copying back casts to the model's dtype.
    target = _net(seed=1, dtype=torch.bfloat16)
    ema.copy_to(target)
    assert all(p.dtype == torch.bfloat16 for p in target.parameters())
    assert all((p == 1.0).all() for p in target.parameters())  # 1.0000078 rounds to 1 in bf16


def test_state_dict_round_trip_resumes_identically():
    model = _net()
    ema = EMA(model, decay=0.99, warmup=True)
    for step in range(3):
        _set_all(model, float(step))
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = EMA(_net(seed=5), decay=0.99, warmup=True)
    resumed.load_state_dict(state)
    assert resumed.num_updates == 3
    for name in ema.shadow:
        torch.testing.assert_close(resumed.shadow[name], ema.shadow[name])
    _set_all(model, 7.0)
    assert ema.update(model) == resumed.update(model)  # the warm-up continues where it stopped
    for name in ema.shadow:
        torch.testing.assert_close(resumed.shadow[name], ema.shadow[name])

    with pytest.raises(ValueError, match="missing"):
        EMA(nn.Linear(3, 4)).load_state_dict(state)
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(3, 4))


def test_swapped_into_uses_the_average_and_restores_the_weights():
    model = build_model("DiT-XXS/2", input_size=8, in_channels=1, num_classes=4)
    ema = EMA(model, decay=0.5)
    trained = {n: p.detach().clone() + 1.0 for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(trained[n])
    ema.update(model)
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, trained[n] - 0.5)  # halfway back to the initial weights
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_into(model):
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    # The shadow is a complete state dict in the model's own layout (DiT's frozen pos_embed included).
    assert set(ema.shadow) == set(model.state_dict())


class FakeZeRO3:
    """Stands in for deepspeed.zero.GatheredParameters over a 'partitioned' model: outside a gather every
    parameter holds an empty tensor, inside it holds the full data. As in DeepSpeed, what is written
    inside a gather is kept only when modifier_rank is given (modifier_rank=None discards it)."""

    def __init__(self, model):
        self.full = {p: p.detach().clone() for p in model.parameters()}
        self.log = []
        for p in model.parameters():
            p.data = torch.empty(0, dtype=p.dtype)

    @contextmanager
    def __call__(self, params, modifier_rank=None):
        params = list(params)
        self.log.append(("enter", modifier_rank, len(params)))
        for p in params:
            p.data = self.full[p].clone()
        try:
            yield
        finally:
            for p in params:
                if modifier_rank is not None:
                    self.full[p] = p.detach().clone()
                p.data = torch.empty(0, dtype=p.dtype)
            self.log.append(("exit",))

    def step(self, value):
        """An optimizer step on the partitioned weights."""
        for p in self.full:
            self.full[p] = torch.full_like(self.full[p], value)


def test_gather_is_entered_around_reads_and_writes_of_partitioned_weights():
    model = _net()
    full_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = FakeZeRO3(model)
    n_params = len(list(model.parameters()))

    ema = EMA(model, decay=0.75, gather=zero)
    assert zero.log == [("enter", None, n_params), ("exit",)]  # the shadow is built from the gathered weights
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s, full_before[n])

    zero.step(4.0)
    zero.log.clear()
    ema.update(model)
    assert zero.log == [("enter", None, n_params), ("exit",)]
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s, 0.75 * full_before[n] + 0.25 * 4.0)

    # Writing the average into the model needs a gather that keeps the modification (modifier_rank).
    zero.log.clear()
    ema.copy_to(model)
    assert zero.log == [("enter", 0, n_params), ("exit",)]
    names = dict(model.named_parameters())
    for n, s in ema.shadow.items():
        torch.testing.assert_close(zero.full[names[n]], s)

    # Swapping: read (backup), write (EMA in), write (restore).
    zero.step(9.0)
    zero.log.clear()
    with ema.swapped_into(model):
        inside = {n: zero.full[p].clone() for n, p in names.items()}
    assert [entry[1] for entry in zero.log if entry[0] == "enter"] == [None, 0, 0]
    for n, s in ema.shadow.items():
        torch.testing.assert_close(inside[n], s)
        assert (zero.full[names[n]] == 9.0).all()


def _partitioned_net():
    """A net as ZeRO-3 leaves it outside a gather: every parameter empty, tagged with `ds_id` as DeepSpeed does."""
    model = _net()
    FakeZeRO3(model)
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
    return model


@pytest.mark.parametrize("build", [
    pytest.param(lambda model: EMA(model), id="EMA"),
    pytest.param(lambda model: PowerFunctionEMA(model, (0.05, 0.1)), id="PowerFunctionEMA"),  # the post-hoc EMA
])
def test_partitioned_weights_without_gather_are_an_error(build):
    with pytest.raises(ValueError, match="gather=deepspeed.zero.GatheredParameters"):
        build(_partitioned_net())


def test_one_gather_updates_the_ema_and_the_posthoc_profiles_together():
    """Under ZeRO-3 a read of the weights is an all-gather of every parameter: a trial that keeps the running
    EMA and the post-hoc EMA's profiles (models/phema.py) updates both inside one gather per step, with the
    same results as two separate updates."""
    separate, together = _net(), _net()
    zero_a, zero_b = FakeZeRO3(separate), FakeZeRO3(together)
    ema_a, ph_a = EMA(separate, decay=0.9, gather=zero_a), PowerFunctionEMA(separate, (0.05, 0.1), gather=zero_a)
    ema_b, ph_b = EMA(together, decay=0.9, gather=zero_b), PowerFunctionEMA(together, (0.05, 0.1), gather=zero_b)
    assert zero_b.log == [("enter", None, 4), ("exit",)] * 2  # one read each at construction
    for step in range(1, 4):
        zero_a.step(float(step))
        zero_b.step(float(step))
        zero_a.log.clear()
        zero_b.log.clear()
        expected = [ema_a.update(separate), ph_a.update(separate)]
        assert len(zero_a.log) == 4  # two gathers when updated one by one
        assert update_together(together, ema_b, ph_b) == expected
        assert zero_b.log == [("enter", None, 4), ("exit",)]  # one gather for both
    assert ema_b.num_updates == ph_b.num_updates == 3
    for n in ema_a.shadow:
        assert torch.equal(ema_a.shadow[n], ema_b.shadow[n])
        assert all(torch.equal(a[n], b[n]) for a, b in zip(ph_a.shadows, ph_b.shadows))
    with pytest.raises(ValueError, match="different gather"):
        other = PowerFunctionEMA(together, (0.05,),
                                 gather=lambda params, modifier_rank=None: zero_b(params, modifier_rank))
        update_together(together, ema_b, other)
    stranger = PowerFunctionEMA(nn.Linear(3, 4), (0.05,))  # built from another network
    stranger.gather = zero_b
    with pytest.raises(ValueError, match="do not match"):
        update_together(together, ema_b, stranger)


_REAL_ZERO3 = """
import os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, deepspeed
from models.ema import EMA

# As harness.common.process_group does on CPU: no JIT build of DeepSpeed's shared-memory all-reduce op
# (minutes on 2 cores; gloo is enough for one process).
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
assert all(p.numel() == 0 for p in model.parameters())  # really partitioned
G = deepspeed.zero.GatheredParameters
ema = EMA(model, decay=0.5, gather=G)
with G(list(model.parameters()), modifier_rank=0):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data.fill_(3.0)
ema.update(model)
for n, s in ema.shadow.items():
    assert torch.allclose(s, 0.5 * before[n] + 1.5), n
with ema.swapped_into(model), G(list(model.parameters())):
    assert all(torch.allclose(p, ema.shadow[n]) for n, p in model.named_parameters())
with G(list(model.parameters())):
    assert all((p == 3.0).all() for p in model.parameters())
ema.copy_to(model)
with G(list(model.parameters())):
    assert all(torch.allclose(p, ema.shadow[n]) for n, p in model.named_parameters())
print("ZERO3-EMA-OK")
"""



@pytest.mark.parametrize("decay,steps,warmup", [(0.99, 300, False), (0.99, 300, True), (0.999, 2000, False),
                                                 (0.999, 2000, True), (0.9, 5, True)])
def test_the_initial_weights_share_the_sweep_warns_about_is_what_the_ema_keeps(decay, steps, warmup):
    """harness.checks.ema_init_share (the sweep's warning) against the EMA itself: a weight that starts at 1
    and is 0 after every step is left at exactly the initial weights' share."""

    from harness.checks import ema_init_share

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=decay, warmup=warmup)
    with torch.no_grad():
        model.weight.zero_()
    for _ in range(steps):
        ema.update(model)
    kept = ema.shadow["weight"].double().item()
    share = ema_init_share(SimpleNamespace(ema_decay=decay, steps=steps, ema_warmup=warmup))
    assert share == pytest.approx(kept, rel=1e-4, abs=1e-30)
    assert (share >= 0.01) == (not warmup and decay ** steps >= 0.01)


@pytest.mark.slow
def test_real_deepspeed_zero3_gathered_parameters(tmp_path):
    """The same contract against real ZeRO-3 partitioning (one gloo process), in a subprocess so that
    DeepSpeed's process group does not outlive the test."""
    pytest.importorskip("deepspeed")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "zero3_ema.py"
    script.write_text(_REAL_ZERO3)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert "ZERO3-EMA-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
