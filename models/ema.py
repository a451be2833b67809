"""Exponential moving average of a model's weights (DiT evaluates its EMA weights, decay 0.9999).

    ema = EMA(model, decay=0.9999, warmup=False, gather=None)
    ema.update(model)                 # after each optimizer step
    with ema.swapped_into(model):     # evaluate / sample with the EMA weights, then restore
        ...
    ema.copy_to(other_model)          # or copy them for good (e.g. into an unpartitioned sampling model)
    torch.save(ema.state_dict(), ...); ema.load_state_dict(torch.load(..., weights_only=True))
    update_together(model, ema, phema)  # several averages of one model (models/phema.py): one read

The shadow is kept in fp32 (or the parameter's precision if higher): a bf16 shadow could not move by the
(1 - 0.9999) * difference increments of an update and would stall. Every named parameter is tracked,
frozen ones included (they stay constant), so the shadow is a complete set of model weights under the
model's own parameter names; buffers are not averaged.

ZeRO-3: parameters partitioned across ranks hold no data outside a gather. Pass `gather`, a callable with
the signature of `deepspeed.zero.GatheredParameters` (this module never imports DeepSpeed): it is called
as `gather(params)` around every read of the model's weights (init, update, backup) and as
`gather(params, modifier_rank=0)` around every write into them (copy_to, swap, restore), so that the
written full tensors are re-partitioned instead of discarded. The shadow is full and identical on every
rank (each rank averages the same gathered weights), so any rank may save it. A gather is an all-gather of
every parameter: when a trial keeps this EMA and the post-hoc EMA's profiles (models/phema.py),
`update_together` updates them all inside one gather instead of one per average.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn

GatherFn = Callable[..., ContextManager]


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False, gather: GatherFn | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1]; got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.gather = gather
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = full_shadow(model, gather)

    # -- the update -------------------------------------------------------------------------------
    def decay_at(self, num_updates: int) -> float:
        """The decay used by the update that follows `num_updates` earlier ones. With warm-up,
        min(decay, (1 + n) / (10 + n)): early averages forget the random initialisation quickly."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    def update(self, model: nn.Module) -> float:
        """shadow <- d * shadow + (1 - d) * weights. Returns the decay d that was used."""
        return update_together(model, self)[0]

    def _apply(self, names: list[str], values: list[torch.Tensor]) -> float:
        """The update from the weights already read (`values`, in the shadow's dtype and device)."""
        d = self.decay_at(self.num_updates)
        torch._foreach_lerp_([self.shadow[n] for n in names], values, 1.0 - d)
        self.num_updates += 1
        return d

    def _reference(self) -> dict[str, torch.Tensor]:
        return self.shadow

    # -- using the averaged weights -------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (cast to each parameter's dtype)."""
        names, params = self._named(model)
        with self._writing(params):
            for name, p in zip(names, params):
                p.copy_(self.shadow[name])

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model carries the EMA weights; its own weights come back afterwards
        (also on an exception). The backup is a full copy in the model's precision."""
        names, params = self._named(model)
        with torch.no_grad(), self._reading(params):
            backup = {name: p.detach().clone() for name, p in zip(names, params)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad(), self._writing(params):
                for name, p in zip(names, params):
                    p.copy_(backup[name])

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"shadow": {param name: fp32 tensor}, "decay", "warmup", "num_updates"}; plain tensors and
        numbers, so torch.load(..., weights_only=True) reads it."""
        # References, like nn.Module.state_dict(): save it (or clone it) before the next update.
        return {"shadow": dict(self.shadow),
                "decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(missing) > 5 or len(unexpected) > 5 else ''}")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for {name!r} has shape {tuple(value.shape)}, "
                                 f"the model {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        # The configured decay/warm-up win (a resumed run may change them on purpose); the count resumes.
        self.num_updates = int(state.get("num_updates", 0))

    # -- internals --------------------------------------------------------------------------------
    def _named(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        named = list(model.named_parameters())
        names = [n for n, _ in named]
        shadow = getattr(self, "shadow", None)
        if shadow is not None and (len(names) != len(shadow) or any(n not in shadow for n in names)):
            unknown = [n for n in names if n not in shadow][:3]
            raise ValueError(f"the model's parameters do not match the EMA's (e.g. {unknown}); pass the same "
                             f"network the EMA was built from (engine.module, not a wrapper)")
        return names, [p for _, p in named]

    def _reading(self, params: list[nn.Parameter]) -> ContextManager:
        return nullcontext() if self.gather is None else self.gather(params)

    def _writing(self, params: list[nn.Parameter]) -> ContextManager:
        return nullcontext() if self.gather is None else self.gather(params, modifier_rank=0)


# -- shared by models/ema.py and models/phema.py -------------------------------------------------------

def full_shadow(model: nn.Module, gather: GatherFn | None) -> dict[str, torch.Tensor]:
    """A full copy of every named parameter, in fp32 or the parameter's precision if higher (a bf16
    shadow would stall, see the module docstring), read inside gather(params) when given. Partitioned
    parameters (ZeRO-3 tags them with ds_id; outside a gather they read as empty) without a gather are a
    ValueError."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    if gather is None and any(hasattr(p, "ds_id") for p in params):
        raise ValueError("the model's parameters are partitioned (DeepSpeed ZeRO-3): pass "
                         "gather=deepspeed.zero.GatheredParameters")
    with nullcontext() if gather is None else gather(params), torch.no_grad():
        return {name: p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for name, p in named}


@torch.no_grad()
def update_together(model: nn.Module, *averages) -> list:
    """One optimizer step more for several weight averages of the same model (an EMA, a PowerFunctionEMA
    of models/phema.py): the weights are read once, inside one gather (under ZeRO-3 an all-gather of every
    parameter, the costly part of an update), and each converted to the shadows' precision once. Every
    average must use the same gather. Returns each average's update result (its decay, or betas) in order.
    A collective under ZeRO-3: every rank calls it."""
    if not averages:
        return []
    gather = averages[0].gather
    if any(a.gather is not gather for a in averages[1:]):
        raise ValueError("update_together: the averages use different gather functions; build them with the same one")
    names, params = averages[0]._named(model)
    for other in averages[1:]:
        other._named(model)  # each checks the model is the one it was built from
    with nullcontext() if gather is None else gather(params):
        reference = averages[0]._reference()
        values = [p.detach().to(device=reference[n].device, dtype=reference[n].dtype) for n, p in zip(names, params)]
        results = []
        for average in averages:
            own = average._reference()
            mine = [v if (v.device, v.dtype) == (own[n].device, own[n].dtype)
                    else v.to(device=own[n].device, dtype=own[n].dtype) for n, v in zip(names, values)]
            results.append(average._apply(names, mine))
    return results
