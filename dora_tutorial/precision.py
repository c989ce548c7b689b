"""Low precision: does a layer's magnitude train, and how much of the update survives a merge.

Both measures serve the notebook's low-precision cells and the conformance check alike. A
bfloat16 number has 8 significant bits: near m = 0.6 its neighbours are 2^-8 apart, while one
Adam step moves a parameter by about the learning rate. A magnitude kept in bfloat16 therefore
rounds back to where it was after every step at usual fine-tuning rates, and nothing fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def magnitude_moves(layer, m, x, steps=20, lr=1e-4, seed=0):
    """Train ``layer``'s trainable parameters for ``steps`` Adam steps at ``lr`` towards a random
    target; return (fraction of m's entries that changed, whether m stayed finite).

    ``m`` is the magnitude parameter (DoRA's m, PEFT's ``lora_magnitude_vector``); ``x`` an input
    in the dtype the layer takes. Float32 training moves every entry with a gradient; an m that
    is not trainable does not move."""
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        target = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(seed))
    before = m.detach().clone()
    for _ in range(steps):
        loss = F.mse_loss(layer(x).float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = m.detach()
    return (after != before).float().mean().item(), bool(after.isfinite().all())


def merge_error(merged, exact, W0):
    """How much of the update a merged weight lost: ||merged - exact|| / ||exact - W0||, and the
    same for ``exact`` rounded once to the base's dtype (the least any merge can lose).

    ``exact``: W' in float64 from the layer's own parameters; ``W0``: the base weight, in the
    base's dtype."""
    exact = exact.double()
    update = (exact - W0.double()).norm()

    def lost(weight):
        return ((weight.double() - exact).norm() / update).item()

    return lost(merged), lost(exact.to(W0.dtype))
