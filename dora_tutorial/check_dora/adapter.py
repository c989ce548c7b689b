"""Finding a layer's A, B and m without knowing their names: by shape, then by initial values."""

from dataclasses import dataclass

import torch


class NotIdentified(Exception):
    """The layer's A, B and m could not be found; the message says why."""


def as_matrix(t):
    """A kernel (out, in, kh, kw) as the matrix (out, in * kh * kw), the form every weight is
    compared in; vectors and matrices as they are."""
    return t.flatten(1) if t.dim() > 2 else t


@dataclass
class Adapter:
    names: tuple[str, str, str]  # of the parameters holding A, B and m
    transposed: tuple[bool, bool, None]  # A stored as (in, r), B as (r, out); else (r, in) and
    # (out, r), or kernels (r, ...) and (out, r, 1, 1)
    axis: int  # 1: one magnitude per output row, 0: per input column

    def tensors(self, layer, grads=False):
        """A (r, in), B (out, r) and m (flat), or with grads=True their gradients (None where
        there is none), whatever the layout the layer keeps them in."""
        found = []
        for name, transposed in zip(self.names, self.transposed, strict=True):
            t = layer.get_parameter(name)
            t = t.grad if grads else t
            if t is not None:
                t = t.flatten() if transposed is None else t.T if transposed else as_matrix(t)
            found.append(t)
        return found

    def assign(self, layer, A, B, m):
        """Set the layer's A, B and m (given in the canonical layout)."""
        with torch.no_grad():
            for name, transposed, value in zip(self.names, self.transposed, (A, B, m), strict=True):
                p = layer.get_parameter(name)
                p.copy_((value.T if transposed else value).reshape(p.shape))

    def describe(self, layer):
        return ", ".join(
            f"{what} = {name} {tuple(layer.get_parameter(name).shape)}"
            for what, name in zip("ABm", self.names, strict=True)
        )


def _listing(params):
    return ", ".join(f"{n} {tuple(p.shape)}" for n, p in params) or "none"


def _one(candidates, what, wanted, params):
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotIdentified(f"no parameter for {what} ({wanted}); parameters: {_listing(params)}")
    names = ", ".join(n for n, _, _ in candidates)
    raise NotIdentified(f"several parameters could be {what} ({wanted}): {names}")


def find_adapter(layer, W0, b, rank, W_init, rtol=1e-6) -> Adapter:
    """A, B and m of a freshly built layer by shape and initial values (never by name); W_init:
    its effective weight; rtol: how closely m must start at the norms."""
    n_out, n_in = W0.shape

    def is_base(p):
        p = as_matrix(p.detach())
        return any(
            t is not None and p.shape == t.shape and torch.equal(p, t) for t in (W0, W0.T, b)
        )

    params = [(n, p) for n, p in layer.named_parameters() if not is_base(p)]
    found = {}
    for what, shapes in (
        ("A", {(rank, n_in): False, (n_in, rank): True}),
        ("B", {(n_out, rank): False, (rank, n_out): True}),
    ):
        cands = [(n, p, shapes[s]) for n, p in params if (s := tuple(as_matrix(p).shape)) in shapes]
        if len(cands) > 1:  # B starts at zero, A does not
            cands = [c for c in cands if c[1].detach().any() == (what == "A")]
        found[what] = _one(cands, what, " or ".join(map(str, shapes)), params)

    # a vector: at most one axis longer than 1
    sized = [
        (n, p)
        for n, p in params
        if p.dim() >= 1 and sum(s > 1 for s in p.shape) <= 1 and p.numel() in (n_out, n_in)
    ]
    if not sized:
        raise NotIdentified(
            f"no magnitude vector m ({n_out} or {n_in} entries): this looks like LoRA, not DoRA. "
            f"Parameters: {_listing(params)}"
        )
    matches = [
        (n, p, axis)
        for n, p in sized
        for axis in (1, 0)
        # the initial W' too: a layer computing in float32 starts at W0 rounded
        if any(
            p.numel() == len(s) and torch.allclose(p.detach().double().flatten(), s, rtol=rtol)
            for s in (W0.double().norm(dim=axis), W_init.norm(dim=axis))
        )
    ]
    if not matches:
        raise NotIdentified(
            f"{_listing(sized)} has the size of a magnitude vector, but its initial values are "
            "neither the row norms of W0 nor its column norms (DoRA starts at m = ||W0||; a "
            "magnitude kept as log m or as a factor of ||W0|| cannot be checked)"
        )
    (a, _, a_t), (b_name, _, b_t) = found["A"], found["B"]
    m, _, axis = _one(matches, "m", "the row or column norms of W0", params)
    return Adapter((a, b_name, m), (a_t, b_t, None), axis)
