"""Finding a layer's A, B and m without knowing their names: by shape, then by initial values."""

from dataclasses import dataclass

import torch

from .reference import as_matrix, norms


class NotIdentified(Exception):
    """The layer's A, B and m could not be found; the message says why."""


def _canonical(t, transposed):
    """A (r, in), B (out, r) or m (flat), or its gradient, in the canonical layout
    (transposed=None: m)."""
    return t.flatten() if transposed is None else t.T if transposed else as_matrix(t)


@dataclass
class Adapter:
    """Where a layer keeps A, B and m (parameter names), and in which layout."""

    a: str
    a_transposed: bool  # stored as (in, r); else (r, in) or a kernel (r, ...)
    b: str
    b_transposed: bool  # stored as (r, out); else (out, r) or a kernel (out, r, 1, 1)
    m: str
    axis: int  # 1: one magnitude per output row, 0: per input column

    def _slots(self):
        return ((self.a, self.a_transposed), (self.b, self.b_transposed), (self.m, None))

    def tensors(self, layer):
        """A (r, in), B (out, r) and m (flat), whatever the layout the layer stores them in."""
        return [_canonical(layer.get_parameter(n), t) for n, t in self._slots()]

    def grads(self, layer):
        """The gradients of A, B and m in the canonical layout (None where there is none)."""
        grads = [(layer.get_parameter(n).grad, t) for n, t in self._slots()]
        return [None if g is None else _canonical(g, t) for g, t in grads]

    def assign(self, layer, A, B, m):
        """Set the layer's A, B and m (given in the canonical layout)."""
        with torch.no_grad():
            for (name, transposed), value in zip(self._slots(), (A, B, m), strict=True):
                p = layer.get_parameter(name)
                p.copy_((value.T if transposed else value).reshape(p.shape))

    def describe(self, layer):
        return ", ".join(
            f"{what} = {name} {tuple(layer.get_parameter(name).shape)}"
            for what, (name, _) in zip("ABm", self._slots(), strict=True)
        )


def _listing(params):
    return ", ".join(f"{n} {tuple(p.shape)}" for n, p in params) or "none"


def _is_base(p, W0, b):
    """Whether p holds the base layer's weight (or its transpose) or bias."""
    p = as_matrix(p.detach())
    if p.shape == W0.shape and torch.equal(p, W0) or p.shape == W0.T.shape and torch.equal(p, W0.T):
        return True
    return b is not None and p.shape == b.shape and torch.equal(p, b)


def _one(candidates, what, wanted, params):
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotIdentified(f"no parameter for {what} ({wanted}); parameters: {_listing(params)}")
    names = ", ".join(n for n, _, _ in candidates)
    raise NotIdentified(f"several parameters could be {what} ({wanted}): {names}")


def _vector_like(p):
    return p.dim() >= 1 and sum(s > 1 for s in p.shape) <= 1


def find_adapter(layer, W0, b, rank, W_init, rtol=1e-6) -> Adapter:
    """A, B and m of a freshly built layer, by shape and initial values (never by name).

    W0, b: the base layer's weight and bias; W_init: the layer's effective weight at init;
    rtol: how closely m must start at the norms (the rounding of the layer's dtype)."""
    n_out, n_in = W0.shape
    params = [(n, p) for n, p in layer.named_parameters() if not _is_base(p, W0, b)]
    shaped = {
        "A": {(rank, n_in): False, (n_in, rank): True},
        "B": {(n_out, rank): False, (rank, n_out): True},
    }
    found = {}
    for what, shapes in shaped.items():
        cands = [(n, p, shapes[s]) for n, p in params if (s := tuple(as_matrix(p).shape)) in shapes]
        if len(cands) > 1:  # B starts at zero, A does not
            cands = [c for c in cands if c[1].detach().any() == (what == "A")]
        wanted = " or ".join(str(s) for s in shapes)
        found[what] = _one(cands, what, wanted, params)

    sized = [(n, p) for n, p in params if _vector_like(p) and p.numel() in (n_out, n_in)]
    if not sized:
        raise NotIdentified(
            f"no magnitude vector m: no parameter has {n_out} (out_features) or {n_in} "
            f"(in_features) entries besides the bias; this looks like LoRA, not DoRA. "
            f"Parameters: {_listing(params)}"
        )
    matches = []
    for n, p in sized:
        for axis in (1, 0):
            # the initial W' too: a layer computing in float32 starts at W0 rounded
            starts = (norms(W0.double(), axis), norms(W_init, axis))
            flat = p.detach().double().flatten()
            if any(flat.shape == s.shape and torch.allclose(flat, s, rtol=rtol) for s in starts):
                matches.append((n, p, axis))
    if not matches:
        raise NotIdentified(
            f"{_listing(sized)} has the size of a magnitude vector, but its initial values are "
            "neither the row norms of W0 nor its column norms; DoRA starts from m = ||W0|| so "
            "that the layer starts as the base layer, and this check needs m in those units "
            "(a magnitude kept as log m or as a factor of ||W0|| cannot be checked)"
        )
    (a, _, a_t), (b_name, _, b_t) = found["A"], found["B"]
    m, _, axis = _one(matches, "m", "the row or column norms of W0", params)
    return Adapter(a, a_t, b_name, b_t, m, axis)
