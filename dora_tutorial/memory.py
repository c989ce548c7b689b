"""What autograd keeps for backward: the probe behind ``helpers.saved_tensor_bytes``."""

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _NewStorages(TorchDispatchMode):
    """Records the storages that operators allocate (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.new: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = t.untyped_storage()._cdata
                if key not in inputs:
                    self.new.add(key)
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
        result = fn()
    total = sum(
        nbytes for key, (ref, nbytes) in packed.items() if key in tracker.new and not ref.expired()
    )
    del result
    return total
