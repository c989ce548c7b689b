"""dora_tutorial/check_dora: a layer with one planted difference fails its own check only, with
its kind; the notebook's layers and PEFT's pass; the command line and its exit statuses.
ReferenceDoRA is the paper's layer on an nn.Linear or an nn.Conv2d (A and B as kernels, PEFT's
layout), with one switch per planted difference."""

import functools
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_tutorial.check_dora as checker
from dora_tutorial.check_dora import CHECKS, check_dora, main, peft_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
P, C, R = checker.PAPER, checker.CONVENTION, checker.ROBUSTNESS


class ReferenceDoRA(nn.Module):
    """The paper's DoRA on an nn.Linear or an nn.Conv2d; ``plant`` names one difference."""

    def __init__(self, base, rank, alpha, plant=None):
        super().__init__()
        self.base, self.plant = base.requires_grad_(False), plant
        w, kernel = base.weight, tuple(base.weight.shape[2:])
        low = w.dtype in (torch.bfloat16, torch.float16) and plant != "adapters in bfloat16"
        dtype = torch.float32 if low else w.dtype  # float32 adapters on a half base, as PEFT
        self.A = nn.Parameter(torch.empty(rank, w.shape[1], *kernel, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        B = torch.randn if plant == "non-zero initial B" else torch.zeros
        self.B = nn.Parameter(B(w.shape[0], rank, *(1 for _ in kernel)).to(dtype))
        self.axis = 0 if plant == "norm per column" else 1
        m = w.detach().to(dtype).flatten(1).norm(dim=self.axis)
        m = m.log() if plant == "log m" else m  # cannot be identified by value
        self.m = nn.Parameter(m.reshape(-1, 1) if plant == "m as (out, 1)" else m)
        self.m.requires_grad_(plant != "m not trained")
        self.scaling = alpha if plant == "scaling alpha" else alpha / rank
        if plant == "no magnitude":  # LoRA
            del self.m

    def V(self):
        """W0 + s B A as a matrix, in the adapters' dtype."""
        W0 = self.base.weight.flatten(1).to(self.A.dtype)
        return W0 + self.scaling * self.B.flatten(1) @ self.A.flatten(1)

    def apply(self, x, W, bias=True):
        """The base layer's function with weight matrix W, in W's dtype, answered in x's."""
        b = self.base.bias if bias else None
        b = None if b is None else b.to(W.dtype)
        if isinstance(self.base, nn.Conv2d):
            c = self.base
            y = F.conv2d(x.to(W.dtype), W.reshape(c.weight.shape), b, c.stride, c.padding)
        else:
            y = F.linear(x.to(W.dtype), W, b)
        return y.to(x.dtype)

    def forward(self, x):
        if self.plant == "2-D inputs only" and x.dim() != 2:
            raise ValueError(f"expected (batch, in_features), got {tuple(x.shape)}")
        V = self.V()
        if self.plant == "no magnitude":
            return self.apply(x, V)
        if self.plant == "float32 norm":  # whatever the dtype, and no floor
            return self.apply(x, self.m[:, None] * V / V.float().norm(dim=1, keepdim=True).detach())
        norm = V.norm(dim=self.axis, keepdim=True).clamp_min(1e-12)
        k = self.m.reshape(norm.shape) / (norm if self.plant == "no detach" else norm.detach())
        if self.plant == "rescaled bias":  # the efficient forward's bug: base_layer(x) rescaled
            return k.reshape(-1, *(1 for _ in self.A.shape[2:])) * self.apply(x, V)
        return self.apply(x, k * V)


# named factories: command-line targets
MatrixInputsOnly = functools.partial(ReferenceDoRA, plant="2-D inputs only")
scaled_by_alpha = functools.partial(ReferenceDoRA, plant="scaling alpha")
Float32Norm = functools.partial(ReferenceDoRA, plant="float32 norm")
LoRA = functools.partial(ReferenceDoRA, plant="no magnitude")


class DropoutDoRA(ReferenceDoRA):
    """Takes dropout=p: PEFT's placement, or one of two common mistakes."""

    def __init__(self, linear, rank, alpha, dropout=0.0, plant=None):
        super().__init__(linear, rank, alpha, plant)
        self.p = dropout

    def forward(self, x):
        if not self.training or self.plant == "dropout ignored":
            return super().forward(x)
        x_d = F.dropout(x, self.p)
        if self.plant == "dropout on the base path too":  # y = DoRA(dropout(x))
            return super().forward(x_d)
        V = self.V()
        W = self.m[:, None] * V / V.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()
        return self.base(x) + self.apply(x_d, W - self.base.weight.to(W.dtype), bias=False)


class MergingDoRA(ReferenceDoRA):
    """With merged_weight() and an in-place merge() / unmerge()."""

    delta = None

    def merged_weight(self):
        V = self.V()
        if self.plant == "merged_weight() is V":
            return V
        return self.m[:, None] * V / V.norm(dim=1, keepdim=True)

    def merge(self):
        with torch.no_grad():
            self.delta = self.merged_weight() - self.base.weight
            self.base.weight += self.delta

    def unmerge(self):
        with torch.no_grad():
            if self.plant != "unmerge keeps W'":
                self.base.weight -= self.delta
            self.delta = None

    def forward(self, x):
        return self.base(x) if self.delta is not None else super().forward(x)


# id (the plant, "conv " in front for a Conv2d): (layer class, {failing check: its kind}, what
# the first failing check says)
CASES = {
    "reference": (ReferenceDoRA, {}, None),
    "m as (out, 1)": (ReferenceDoRA, {}, None),  # the official code's shape
    "norm per column": (ReferenceDoRA, {2: P}, "INPUT column"),
    "scaling alpha": (ReferenceDoRA, {4: C}, "scaled by alpha (= 5)"),
    "rescaled bias": (ReferenceDoRA, {5: P}, "rescaled by m / ||V||"),
    "no detach": (ReferenceDoRA, {6: C}, "not detached"),
    "non-zero initial B": (ReferenceDoRA, {1: C}, "B is not zero at init"),
    "2-D inputs only": (ReferenceDoRA, {7: P}, "the layer raised ValueError"),
    "m not trained": (ReferenceDoRA, {7: P, 11: R}, "gradient of m"),
    "float32 norm": (ReferenceDoRA, {8: R}, "all-zero weight row"),  # no floor on the norm
    "adapters in bfloat16": (ReferenceDoRA, {11: R}, "m (bfloat16)"),
    "dropout as in PEFT": (DropoutDoRA, {}, None),
    "dropout on the base path too": (DropoutDoRA, {9: C}, "base path sees"),
    "dropout ignored": (DropoutDoRA, {9: C}, "fsdp_qlora #68"),
    "merge and unmerge": (MergingDoRA, {}, None),
    # + 12: W' = V misses the magnitude, so a bfloat16 merge loses more than rounding does
    "merged_weight() is V": (MergingDoRA, {10: P, 12: R}, "merged_weight() is"),
    "unmerge keeps W'": (MergingDoRA, {10: P}, "after unmerge() the base"),
    "conv reference": (ReferenceDoRA, {}, None),
    "conv norm per column": (ReferenceDoRA, {2: P}, "INPUT column"),
    "conv scaling alpha": (ReferenceDoRA, {4: C}, "scaled by alpha"),
    "conv no detach": (ReferenceDoRA, {6: C}, "not detached"),
    "conv rescaled bias": (ReferenceDoRA, {5: P}, "rescaled by m / ||V||"),
}
DTYPES = [torch.float64, torch.float32]


def failures(report):
    return {r.number: r.kind for r in report.results if r.status == "fail"}


@pytest.mark.parametrize(
    "case, dtype", [(c, d) for c in CASES for d in DTYPES if "conv" not in c or d == DTYPES[0]]
)
def test_a_planted_difference_fails_its_own_check_with_its_kind(case, dtype):
    """In float64 and, with tolerances from float32's rounding, in float32."""
    cls, expected, says = CASES[case]
    kind = "conv2d" if case.startswith("conv ") else "linear"
    report = check_dora(
        functools.partial(cls, plant=case.removeprefix("conv ")), kind=kind, dtype=dtype
    )
    assert report.identified, report.problem
    assert failures(report) == expected, str(report)
    status = next((s for k, s in ((P, 1), (C, 3), (R, 4)) if k in expected.values()), 0)
    assert report.passed == (not expected) and report.exit_status == status
    if says:
        detail = next(r.detail for r in report.results if r.number == min(expected))
        assert says in " ".join(detail.split())


def test_report_says_one_line_per_check_and_the_verdict(nb):
    """The notebook prints this report: its layout and its verdict."""
    report = check_dora(nb.RasbtStyleDoRA)
    lines = str(report).splitlines()
    assert lines[:2] == [
        "DoRA conformance: RasbtStyleDoRA",
        "  found A = A (11, 3), B = B (3, 7), m = m (1, 11)",
    ]
    checks = [line for line in lines[2:-2] if not line.startswith(" " * 4)]  # wrapped: indented
    marks = "pass FAIL pass FAIL pass FAIL pass FAIL skip skip FAIL skip".split()
    assert [line.split(".")[0] for line in checks] == [f"  {s} {n}" for n, s in enumerate(marks, 1)]
    assert checks[1].startswith("  FAIL 2. magnitude axis [paper]: ")
    assert all(len(line) <= 96 for line in lines)  # fits a notebook's output area
    assert (
        "magnitude per input column, scaling alpha, norm not detached" in report.results[6].detail
    )
    assert report.summary() == (
        "5 of 12 checks fail: not DoRA as the paper defines it (2); differs from the official "
        "code and PEFT (4, 6); robustness (8, 11), 3 not applicable (9, 10, 12)"
    )
    assert report.exit_status == 1  # the most serious kind decides


@pytest.mark.parametrize(
    "factory, says, check_1",
    [
        (functools.partial(ReferenceDoRA, plant="log m"), "neither the row norms of W0", "fail"),
        ("LinearWithLoRA", "this looks like LoRA, not DoRA", "pass"),
        (lambda linear: linear, "must take (linear, rank, alpha)", "fail"),
    ],
    ids=["log-magnitude", "lora", "wrong-signature"],
)
def test_unidentifiable_layers_run_check_1_only_and_say_why(nb, factory, says, check_1):
    report = check_dora(getattr(nb, factory) if isinstance(factory, str) else factory)
    assert not report.identified and says in report.problem
    assert report.exit_status == 2 and not report.passed
    assert [r.status for r in report.results] == [check_1] + ["skip"] * (len(CHECKS) - 1)
    assert f"cannot check this layer: {report.problem}" in " ".join(str(report).split())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "name, options, expected",
    [
        # the definition alone: no floor on the norm (8), no dropout (9 skips), and A, B, m in
        # the base's dtype, so on a bfloat16 base m does not train (11) and its merge rounds (12)
        ("LinearWithDoRA", {}, {8: R, 11: R, 12: R}),
        ("DoRALinear", {"factored_norm": True}, {}),
        ("DoRALinear", {"factored_norm": False}, {}),
        ("DoRALinear", {"detach_norm": False}, {6: C}),
    ],
    ids=["LinearWithDoRA", "factored", "dense", "no-detach"],
)
def test_notebook_layers(nb, name, options, expected, dtype):
    if not options.get("detach_norm", True) and dtype != torch.float64:
        pytest.skip("float64 tells the detach apart")
    report = check_dora(functools.partial(getattr(nb, name), **options), dtype=dtype)
    assert failures(report) == expected, str(report)
    skipped = [r.number for r in report.results if r.status == "skip"]
    assert skipped == ([9] if name == "LinearWithDoRA" else [])
    if name == "DoRALinear" and not expected:
        assert report.adapter == "A = lora.A (3, 11), B = lora.B (7, 3), m = m (7,)"
        within = f"(within {str(dtype).removeprefix('torch.')} rounding: "
        assert (within in " ".join(str(report).split())) == (dtype != torch.float64)


def test_a_layer_computing_in_float32_is_checked_with_float32_tolerances():
    report = check_dora(Float32Norm)  # built in float64
    assert report.precision == "float32" and failures(report) == {8: R}, str(report)
    assert "computes in float32 with float64 parameters" in " ".join(str(report).split())


@pytest.mark.parametrize(
    "kind, dtype", [("linear", d) for d in [*DTYPES, torch.bfloat16]] + [("conv2d", DTYPES[0])]
)
def test_peft_dora_passes_all_but_8_on_zero_rows(kind, dtype):
    """PEFT divides by the raw row norm: an all-zero row gives 0 / 0 = NaN (a robustness
    finding; if a later PEFT floors it, expect every check to pass)."""
    if (reason := peft_unavailable_reason()) is not None:
        pytest.skip(reason)
    report = check_dora(checker.PeftDoRA, kind=kind, dtype=dtype)
    m = "(1, 7, 1, 1)" if kind == "conv2d" else "(7,)"
    assert report.adapter.endswith(f"lora_magnitude_vector.default.weight {m}")
    detail = {r.number: r.detail for r in report.results}
    assert "all-zero weight row gives NaN or inf in the output at initialisation" in detail[8]
    import peft

    if dtype == torch.bfloat16 and tuple(map(int, peft.__version__.split(".")[:2])) < (0, 21):
        # PEFT 0.15 keeps float32 adapters on a bfloat16 base but cannot merge them into it
        assert failures(report) in ({8: R}, {8: R, 10: P})
        return
    assert failures(report) == {8: R}, str(report)
    if kind == "linear":
        assert "merge_and_unload(), merge() in place, unmerge()" in detail[10]


def test_leaves_the_global_random_state_alone(nb):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert check_dora(nb.DoRALinear).passed
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The working directory, holding layers.py: this file's layers as a user's module."""
    (tmp_path / "layers.py").write_text(Path(__file__).read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("layers", None)


@pytest.mark.parametrize(
    "args, status, says",
    [
        (["layers.py:ReferenceDoRA"], 0, "9 of 12 checks pass, 3 not applicable (9, 10, 12)"),
        (["layers:scaled_by_alpha"], 3, "FAIL 4. scaling"),  # module.path:factory
        (["layers.py:MatrixInputsOnly"], 1, "FAIL 7. reference formula [paper]"),
        (["layers.py:Float32Norm"], 4, "FAIL 8. zero rows, low precision [robustness]"),
        (["layers.py:LoRA"], 2, "this looks like LoRA, not DoRA"),
        (["--conv2d", "layers.py:ReferenceDoRA"], 0, "ReferenceDoRA on nn.Conv2d"),
        # usage errors: on stderr, nothing on stdout
        (["missing.py:MyDoRA"], 2, "error: cannot load missing.py:MyDoRA: FileNotFoundError"),
        (["layers.py:ReferenceDora"], 2, "error: cannot load layers.py:ReferenceDora: Attribute"),
        (["layers.py"], 2, "error: expected FILE.py:NAME or module:NAME, got 'layers.py'"),
        (["no_such_module:MyDoRA"], 2, "error: cannot load no_such_module:MyDoRA: ModuleNotF"),
    ],
)
def test_cli_exit_status_and_what_it_says(user_dir, capsys, args, status, says):
    assert main(args) == status
    out = capsys.readouterr()
    stream, other = (out.err, out.out) if says.startswith("error") else (out.out, out.err)
    assert says in " ".join(stream.split()) and not other


def test_cli_without_a_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit, match="2"):
        main([])
    assert "give FILE.py:NAME or module:NAME, or --peft" in capsys.readouterr().err


def test_cli_runs_as_a_module_and_import_does_not_load_peft(user_dir):
    code = (
        "import runpy, sys; import dora_tutorial.check_dora; assert 'peft' not in sys.modules; "
        "sys.argv[1:] = ['layers.py:MatrixInputsOnly']; "
        "runpy.run_module('dora_tutorial.check_dora', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "FAIL 7. reference formula" in result.stdout, result.stderr


def test_cli_help_is_the_manual_with_every_check_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "V = W0 + (alpha / r) B A" in out  # the reference formula
    assert all(f"{i}. {c.title} [{c.kind}]" in out for i, c in enumerate(CHECKS, 1))
    assert "exit status: 0 every check passes; 1 a check of kind 'paper' fails" in out


def test_cli_json_gives_every_check_kind_result_and_numbers(user_dir, capsys):
    status = main(["--json", "--dtype", "float32", "layers.py:scaled_by_alpha"])
    data = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert status == data["exit_status"] == 3
    (report,) = data["reports"]
    assert report["dtype"] == "float32"
    assert report["failed"] == {"paper": [], "convention": [4], "robustness": []}
    checks = {c["number"]: c for c in report["results"]}
    assert [(c["title"], c["kind"]) for c in checks.values()] == [(c.title, c.kind) for c in CHECKS]
    assert math.isclose(checks[4]["numbers"]["scaling"], 5, rel_tol=1e-5)
    assert checks[3]["status"] == "pass" and checks[3]["within_rounding"]
    assert 0 < checks[3]["numbers"]["error"] <= checks[3]["numbers"]["tolerance"]
    assert checks[9]["status"] == "skip"


STAND_IN_PEFT = """
LoraConfig = dict

def get_peft_model(model, config):
    raise ImportError("Found an incompatible version of torchao (stand-in)")
"""


@pytest.fixture
def broken_peft(monkeypatch):
    """A stand-in peft that imports fine and raises ImportError when used (an old torchao)."""
    module = types.ModuleType("peft")  # its code runs as the package "peft"
    exec(STAND_IN_PEFT, module.__dict__)
    monkeypatch.setitem(sys.modules, "peft", module)
    checker.peft_unavailable_reason.cache_clear()
    yield module
    checker.peft_unavailable_reason.cache_clear()


def test_peft_that_fails_in_use_is_reported_not_crashed(broken_peft, capsys):
    reason = peft_unavailable_reason()
    assert reason.startswith("peft imports but fails in use (ImportError: Found an incompatible")
    assert main(["--peft"]) == 2  # nothing was checked
    out = capsys.readouterr()
    assert out.err == f"PEFT's DoRA: skipped: {reason}\n" and not out.out
    status = main(["--json", "--peft", f"{Path(__file__)}:ReferenceDoRA"])
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert status == 0 == data["exit_status"]  # the layer that was checked decides
    assert [r["name"] for r in data["reports"]] == ["ReferenceDoRA"]
    assert data["skipped"] == [out.err.strip()]


def test_optional_part_swallows_only_errors_raised_inside_peft(broken_peft, capsys):
    import helpers

    with helpers.optional_part("the stand-in") as part:
        broken_peft.get_peft_model(nn.Linear(2, 2), broken_peft.LoraConfig())
    assert isinstance(part.skipped, ImportError)
    assert capsys.readouterr().out.startswith("Skipping the stand-in: PEFT fails in use")
    with pytest.raises(ValueError, match="our own bug"):
        with helpers.optional_part("the stand-in"):
            raise ValueError("our own bug")  # this project's errors are not hidden
