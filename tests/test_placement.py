"""Placement: with the data on an accelerator, nothing that trains or is compared stays behind.
No GPU needed: the ``meta`` device stands in, under a dispatch mode that makes it strict where a
GPU is: mixing a meta and a (non-scalar) CPU tensor raises, as on CUDA; float64 raises, as on
MPS; values read back are zeros (or True), so the code runs on, and only placement counts."""

import ast
import contextlib
import io
import warnings

import nbformat
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import helpers
from dora_tutorial.training import _fused_adam_works

REPO, DEVICE, aten = helpers.REPO, torch.device("meta"), torch.ops.aten


class LeftOnTheCPU(RuntimeError):
    pass


class FakeAccelerator(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            readback = self.read_back(func, args, kwargs)
            if readback is not NotImplemented:
                return readback
            if func not in (aten.copy_.default, aten._to_copy.default):
                left = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
                if left:
                    raise LeftOnTheCPU(f"{func}: a {tuple(left[0].shape)} tensor on the CPU")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta and t.dtype == torch.float64:
                raise RuntimeError(f"{func}: float64 on the accelerator (MPS has no float64)")
        return out

    @staticmethod
    def read_back(func, args, kwargs):
        if func is aten._local_scalar_dense.default:
            return 0.0 if args[0].dtype.is_floating_point else 0
        if func in (aten.equal.default, aten.allclose.default):  # their read-back is internal
            return True
        if func is aten._to_copy.default and kwargs.get("device", DEVICE).type == "cpu":
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].is_meta:
            return args[0].zero_()
        return NotImplemented


@pytest.fixture
def accelerator():
    with FakeAccelerator():
        yield DEVICE


def fake_mnist(n_train, n_test):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train + n_test, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def small_task(device, n=512):
    mnist = fake_mnist(n + 64, 128)
    return helpers.make_task(*mnist, device=device, degrees=45, n_train=n, n_val=64)


def test_the_stand_in_catches_what_a_gpu_would(accelerator):
    with pytest.raises(RuntimeError, match="float64"):
        torch.ones(4, 3, device=accelerator).double()
    model, task = helpers.make_mlp((784, 32, 10), seed=0), small_task(accelerator)
    with pytest.raises(LeftOnTheCPU):  # the bug this file guards against: a model left behind
        model(task.train_x[:8])  # (plain meta would allow it)


@pytest.mark.parametrize(
    "wrapper", [None, "LinearWithLoRA", "LoRALinear", "LinearWithDoRA", "DoRALinear"]
)
def test_training_merging_and_saving_follow_the_data(nb, accelerator, wrapper, tmp_path):
    task = small_task(accelerator)
    pretrained = helpers.make_mlp((784, 32, 32, 10), seed=0)  # built on the CPU, as a reader would
    helpers.train(pretrained, task, epochs=1, lr=1e-3, batch_size=128, log=None)
    assert all(p.is_meta for p in pretrained.parameters())
    cls = wrapper and getattr(nb, wrapper)
    protocol = dict(epochs=2, lr=1e-3, batch_size=128, record_weights=True, evaluate_on="val")
    runs = helpers.finetune(pretrained, task, seeds=(0, 1), wrapper=cls, log=None, **protocol)
    assert all(p.is_meta for model in runs.models for p in model.parameters())
    assert helpers.accuracy(helpers.make_mlp((784, 10), seed=1), task.test_x, task.test_y) == 0.0
    with pytest.raises(ValueError, match="all zero"):  # float64 on the CPU: read back zeros
        helpers.figure2_points(runs, pretrained, ["2"])
    helpers.compare("A", runs, "B", runs)  # statistics of values read back (zeros): no NaN
    helpers.inference_ms(runs.models[0], task.test_x, repeats=1, warmup=0)
    if wrapper is not None:
        merged = helpers.merge_adapters(runs.models[0], nb.merge)
        assert all(p.is_meta for p in merged.parameters())
        merged(task.test_x)
        path = helpers.save_adapter(runs.models[0], tmp_path / "adapter.pt")
        assert all(t.device.type == "cpu" for t in torch.load(path)["tensors"].values())
        helpers.load_adapter(helpers.add_adapters(pretrained, cls, 4, 8), path)


def test_adam_falls_back_when_the_fused_kernel_fails_at_its_first_step(monkeypatch):
    """torch checks some fused-Adam requirements only at step(): train must not crash there."""

    class FusedFailsAtStep(torch.optim.Adam):
        def step(self, closure=None):
            if self.defaults.get("fused"):
                raise RuntimeError("fused Adam is not supported on this device")
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", FusedFailsAtStep)
    _fused_adam_works.cache_clear()  # it remembers per device and dtype whether fused Adam works
    optimizer = helpers.make_adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert not optimizer.defaults.get("fused")
    _fused_adam_works.cache_clear()


# Placement does not depend on how long training runs: a short protocol keeps this test fast
# (meta tensors cost Python time per operator, not per element).
SHORT_PROTOCOL = {"PRETRAIN_EPOCHS": 1, "FT_EPOCHS": 1, "FT_TRAIN_SIZE": 256, "VAL_SIZE": 128}


class ForTheStandIn(ast.NodeTransformer):
    """Drops assertions (values mean nothing on a device without data); sets SHORT_PROTOCOL."""

    def visit_Assert(self, node):
        return ast.Pass()

    def visit_Assign(self, node):
        name = node.targets[0]
        if isinstance(name, ast.Name) and name.id in SHORT_PROTOCOL:
            node.value = ast.Constant(SHORT_PROTOCOL[name.id])
        return node


@pytest.mark.slow
def test_the_notebook_runs_with_everything_on_the_device(monkeypatch, accelerator, tmp_path):
    """Every code cell, in order, with DORA_DEVICE=meta, fake MNIST and a short protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("DORA_RESULTS", str(tmp_path / "results.json"))  # not the notebook's
    monkeypatch.setenv("DORA_DEVICE", "meta")
    monkeypatch.setattr(helpers, "load_mnist", lambda *a, **k: fake_mnist(1_000, 500))
    real_change, draws = helpers.relative_change, torch.Generator().manual_seed(0)

    def change_of_read_back_zeros(weight, weight0):  # Figure 2 moves weights to the CPU, where
        real_change(torch.eye(2, dtype=weight.dtype), torch.eye(2))  # the meta device's zeros
        d_d, d_m = (0.01 + 0.1 * torch.rand(2, generator=draws)).tolist()  # have no direction
        return {"dD": d_d, "dM": d_m, "orthogonal": d_d / (1 - d_d)}

    monkeypatch.setattr("dora_tutorial.weight_changes.relative_change", change_of_read_back_zeros)
    monkeypatch.chdir(REPO)
    scope = {"__name__": "__main__"}
    cells = nbformat.read(REPO / "DoRA.ipynb", as_version=4).cells
    code = [c.source for c in cells if c.cell_type == "code"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for number, source in enumerate(code, start=1):
            tree = ast.fix_missing_locations(ForTheStandIn().visit(ast.parse(source)))
            try:
                exec(compile(tree, f"code cell {number}", "exec"), scope)
            except LeftOnTheCPU as err:
                raise AssertionError(f"code cell {number}: {err}\n{source[:300]}") from None
            finally:
                plt.close("all")
    assert scope["device"] == DEVICE and all(p.is_meta for p in scope["pretrained"].parameters())
