"""What autograd keeps for backward: the probe behind ``helpers.saved_tensor_bytes``."""

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree) -> set[int]:
    tensors = (t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))
    return {t.untyped_storage()._cdata for t in tensors if t.layout == torch.strided}


class _NewStorages(TorchDispatchMode):
    """Records the storages that operators allocate (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.new: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.new |= _storages(out) - _storages((args, kwargs))
        return out


def saved_tensor_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass of ``fn()`` (e.g. a loss): each storage saved
    for backward, allocated during ``fn()`` and alive after it, once, at full size. Parameters
    and inputs (also saved through a view such as ``W.T``) do not count."""
    packed: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t):
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            packed[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return t

    tracker = _NewStorages()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        result = fn()  # holds the graph, and what it saved, until counted
    total = sum(n for key, (ref, n) in packed.items() if key in tracker.new and not ref.expired())
    del result
    return total
