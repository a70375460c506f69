"""Matrix functions for spectrally constrained weights, one module per concern.

Everything acts on the last two dimensions of a tensor, so a stack of matrices (heads, layers)
is handled in one call, and every function that caps takes its own `w_max`. Two families live side
by side and must not be confused:

* **Approximate, fast** maps used inside training: `newton_schulz` (`orthogonalize`, standard or
  Gram-space, bf16 by default), `caps` (`hard_cap`, `soft_cap`, `spectral_normalize`, `spectral_hammer`,
  `spectral_weight_decay`) and `sigma.sigma_estimate` (power iteration, a *lower* bound — logs only).
* **Sound** upper bounds used by certificates: `sigma.sigma_upper` (float64 Cholesky certificate)
  and `sigma.sigma_upper_gram` (Gram iteration with a rounding margin). Nothing that enters a
  certificate may come from the first family.

All `w_max` are in units of the plain largest singular value σ_max; callers that constrain the
RMS→RMS norm `sqrt(d_in/d_out)·σ_max` convert first (see `lipformer.nn.CappedLinear`).
"""

from .caps import (CAP_SCHEDULE, MIT_HARD_CAP, U_MONOTONE, hard_cap, resolve_cap_method, soft_cap,
                   soft_cap_alpha, soft_cap_map, spectral_hammer, spectral_normalize, spectral_weight_decay)
from .newton_schulz import (BF16_SEGMENT_GAIN, CLASSIC, POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, POLISH, Coefficients, Schedule,
                            auto_picks_gram, coefficient_schedule, gain_restarts, gram_is_cheaper, gram_plan, orthogonalize)
from .sigma import (GRAM_ITERS, gamma, row_norm_upper, sigma_estimate, sigma_upper, sigma_upper_gram,
                    top_singular_triplet)
