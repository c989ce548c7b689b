"""Low precision: does a magnitude train, and how much of the update survives a merge? (A
bfloat16 m near 0.6 has neighbours 2^-8 apart, more than an Adam step: it silently stays put.)"""

import torch
import torch.nn.functional as F


def magnitude_moves(layer, m, x, steps=20, lr=1e-4, seed=0):
    """(fraction of m's entries that changed, whether m stayed finite) after ``steps`` Adam steps
    of ``layer``'s trainable parameters towards a random target. ``m``: DoRA's m or PEFT's
    ``lora_magnitude_vector``; ``x``: an input in the dtype the layer takes."""
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        target = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(seed))
    before = m.detach().clone()
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(layer(x).float(), target).backward()
        optimizer.step()
    after = m.detach()
    return (after != before).float().mean().item(), bool(after.isfinite().all())


def merge_error(merged, exact, W0):
    """||merged - exact|| / ||exact - W0||, and the same for ``exact`` rounded once to W0's dtype
    (the least any merge can lose). ``exact``: W' in float64; ``W0``: the base weight."""
    exact = exact.double()
    update = (exact - W0.double()).norm()
    return tuple(
        ((w.double() - exact).norm() / update).item() for w in (merged, exact.to(W0.dtype))
    )
