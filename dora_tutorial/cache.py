"""The DoRA layers' kept value (W', or k = m / ||V||): it depends on the parameters only."""

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


class InferenceCache:
    """A value computed from a layer's parameters, kept between calls in eval mode with autograd
    off, and recomputed as soon as a parameter (or s) has changed."""

    steps = None  # [optimizer steps so far], counted by a hook on every optimizer's step

    def __init__(self):
        self.key, self.tensors, self.value = None, None, None
        if InferenceCache.steps is None:  # fused optimizers step without bumping t._version
            counter = InferenceCache.steps = [0]

            def count(*_):
                counter[0] += 1

            register_optimizer_step_post_hook(count)

    def get(self, layer, tensors, compute):
        """compute(), or what it returned before while ``tensors`` (the parameters it reads)
        and the layer's scaling s are unchanged and the layer runs in eval mode, no gradients."""
        # nothing is kept in training, for autograd, or for torch.func's stand-in tensors
        parameters = all(isinstance(t, nn.Parameter) and not t.is_inference() for t in tensors)
        if layer.training or torch.is_grad_enabled() or not parameters:
            self.key, self.tensors, self.value = None, None, None
            return compute()
        if self.tensors is None or list(map(id, tensors)) != list(map(id, self.tensors)):
            self.key, self.tensors = None, tensors  # parameters not seen before
        key = [layer.lora.scaling, InferenceCache.steps[0]]
        key += [(t.data_ptr(), t._version) for t in tensors]
        if key != self.key:  # first call, or a parameter was moved or changed in place
            self.key, self.value = key, compute()
        return self.value
