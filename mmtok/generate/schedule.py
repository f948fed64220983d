"""Noise schedules of masked (absorbing-state) diffusion in continuous time.

``alpha(t)`` is the probability that a token is still unmasked at time ``t`` in [0, 1],
with ``alpha(0) = 1`` (clean data) and ``alpha(1) = 0`` (every token masked). Following
MDLM (Sahoo et al., 2024, "Simple and Effective Masked Diffusion Language Models") and
Shi et al. (2024, "Simplified and Generalized Masked Diffusion for Discrete Data"), the
negative ELBO is an integral over ``t`` of the cross-entropy on masked positions, weighted
by ``-alpha'(t) / (1 - alpha(t))``.

The confidence-ordered sampler does not follow ``alpha``. It unmasks on the cosine
schedule of MaskGIT (Chang et al., 2022) or another of :data:`UNMASKING_SCHEDULES`, as
:func:`masked_counts` computes it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class Schedule:
    """Base class of noise schedules. Subclasses implement :meth:`alpha`, :meth:`weight` and :meth:`time_of_masked_share`."""

    name: str = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Return the probability that a token is unmasked at time ``t``."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Return the ELBO weight ``-alpha'(t) / (1 - alpha(t))`` for ``t`` in (0, 1]."""
        raise NotImplementedError

    def time_of_masked_share(self, share: torch.Tensor) -> torch.Tensor:
        """Return the time ``t`` at which the expected share of masked tokens, ``1 - alpha(t)``, is ``share``."""
        raise NotImplementedError

    def unmask_probability(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Return the probability that a masked token at time ``t`` is unmasked at ``s < t``.

        This is ``(alpha(s) - alpha(t)) / (1 - alpha(t))``, the reverse step of the
        absorbing process. It equals 1 when ``s = 0``.
        """
        alpha_t = self.alpha(t)
        return ((self.alpha(s) - alpha_t) / (1 - alpha_t)).clamp(0.0, 1.0)


class LogLinearSchedule(Schedule):
    """``alpha(t) = 1 - t``, so the ELBO weight is ``1 / t``.

    MDLM calls it log-linear because the total noise ``sigma(t) = -log(1 - t)`` is the
    log of a linear function. The expected fraction of masked tokens equals ``t``.
    """

    name = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / t

    def time_of_masked_share(self, share: torch.Tensor) -> torch.Tensor:
        return share.float()


class CosineSchedule(Schedule):
    """``alpha(t) = cos(pi t / 2)``: fewer tokens are masked at small ``t`` than log-linear."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - cos(x) is written as 2 sin(x/2)^2, which keeps its precision for small t.
        half_angle = 0.25 * math.pi * t
        return 0.5 * math.pi * torch.sin(2 * half_angle) / (2 * torch.sin(half_angle) ** 2)

    def time_of_masked_share(self, share: torch.Tensor) -> torch.Tensor:
        return torch.arccos((1 - share.float()).clamp(-1.0, 1.0)) * (2 / math.pi)


SCHEDULES: dict[str, type[Schedule]] = {
    LogLinearSchedule.name: LogLinearSchedule,
    CosineSchedule.name: CosineSchedule,
}


def get_schedule(name: str) -> Schedule:
    """Return the schedule called ``name``, or raise ``ValueError`` listing the choices."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


# Share of positions still masked after a fraction ``r`` of the steps of a confidence
# sampler. MaskGIT (Chang et al., 2022, section 3.2) compares these functions and finds
# the concave ones (cosine, square) best: they unmask few positions while little is known.
UNMASKING_SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda r: math.cos(0.5 * math.pi * r),
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "sqrt": lambda r: 1 - math.sqrt(r),
}


def masked_counts(masked: torch.Tensor, steps: int, schedule: str = "cosine") -> torch.Tensor:
    """Return how many positions stay masked after each step of a confidence sampler.

    Step ``k`` of ``steps`` keeps ``floor(n gamma(k / steps))`` of ``n`` positions masked,
    where ``gamma`` is the unmasking schedule. Each step also unmasks at least one
    position while any remain, so no model call is spent without progress.

    Args:
        masked: ``(B,)`` number of masked positions per row at the start.
        steps: number of sampling steps.
        schedule: a name in :data:`UNMASKING_SCHEDULES`.

    Returns:
        ``(steps, B)`` int64 counts, non-increasing along the steps and 0 at the last step.
    """
    if schedule not in UNMASKING_SCHEDULES:
        raise ValueError(f"unknown unmasking schedule {schedule!r}; choose one of {', '.join(UNMASKING_SCHEDULES)}")
    gamma = UNMASKING_SCHEDULES[schedule]
    counts = []
    remaining = masked.clone()
    for step in range(1, steps + 1):
        target = torch.floor(masked * gamma(step / steps)).long()
        if step == steps:
            target = torch.zeros_like(target)
        remaining = torch.minimum(target, (remaining - 1).clamp(min=0))
        counts.append(remaining)
    return torch.stack(counts)
