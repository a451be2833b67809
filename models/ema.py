"""Exponential moving average of a model's weights (DiT evaluates its EMA weights, decay 0.9999).

    ema = EMA(model, decay=0.9999, warmup=False, gather=None)
    ema.update(model)                 # after each optimizer step
    with ema.swapped_into(model):     # evaluate / sample with the EMA weights, then restore
        ...
    ema.copy_to(other_model)          # or copy them for good (e.g. into an unpartitioned sampling model)
    torch.save(ema.state_dict(), ...); ema.load_state_dict(torch.load(..., weights_only=True))

The shadow is kept in fp32 (or the parameter's precision if higher): a bf16 shadow could not move by the
(1 - 0.9999) * difference increments of an update and would stall. Every named parameter is tracked,
frozen ones included (they stay constant), so the shadow is a complete set of model weights under the
model's own parameter names; buffers are not averaged.

ZeRO-3: parameters partitioned across ranks hold no data outside a gather. Pass `gather`, a callable with
the signature of `deepspeed.zero.GatheredParameters` (this module never imports DeepSpeed): it is called
as `gather(params)` around every read of the model's weights (init, update, backup) and as
`gather(params, modifier_rank=0)` around every write into them (copy_to, swap, restore), so that the
written full tensors are re-partitioned instead of discarded. The shadow is full and identical on every
rank (each rank averages the same gathered weights), so any rank may save it.
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
        names, params = self._named(model)
        if gather is None and any(hasattr(p, "ds_id") for p in params):
            # ZeRO-3 tags its partitioned parameters with ds_id; without a gather they read as empty.
            raise ValueError("the model's parameters are partitioned (DeepSpeed ZeRO-3): pass "
                             "gather=deepspeed.zero.GatheredParameters")
        with self._reading(params):
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
                for name, p in zip(names, params)
            }

    # -- the update -------------------------------------------------------------------------------
    def decay_at(self, num_updates: int) -> float:
        """The decay used by the update that follows `num_updates` earlier ones. With warm-up,
        min(decay, (1 + n) / (10 + n)): early averages forget the random initialisation quickly."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """shadow <- d * shadow + (1 - d) * weights. Returns the decay d that was used."""
        d = self.decay_at(self.num_updates)
        names, params = self._named(model)
        with self._reading(params):
            for name, p in zip(names, params):
                shadow = self.shadow[name]
                shadow.lerp_(p.detach().to(device=shadow.device, dtype=shadow.dtype), 1.0 - d)
        self.num_updates += 1
        return d

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
