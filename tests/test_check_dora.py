"""dora_tutorial/check_dora: each broken DoRA variant fails exactly its own checks.

The variants are written here, small and on purpose: ReferenceDoRA is the paper's layer with
one switch per convention, RasbtStyleDoRA the widely copied from-scratch layer (norm over dim=0,
scaling alpha, no detach, A and B stored transposed), LogMagnitudeDoRA a correct layer whose
magnitude the check cannot identify.
"""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_tutorial.check_dora as check_dora_module
from dora_tutorial.check_dora import (
    CHECKS,
    CONVENTION,
    PAPER,
    ROBUSTNESS,
    check_dora,
    main,
    peft_dora_factory,
    peft_unavailable_reason,
)

REPO = Path(__file__).resolve().parents[1]
ALL = {c.number for c in CHECKS}
KIND = {c.number: c.kind for c in CHECKS}


def expected_status(failing):
    """The exit status the failing checks' kinds give: 1 paper, 3 convention, 4 robustness."""
    kinds = {KIND[n] for n in failing}
    return next((s for k, s in ((PAPER, 1), (CONVENTION, 3), (ROBUSTNESS, 4)) if k in kinds), 0)


class ReferenceDoRA(nn.Module):
    """The paper's DoRA layer; each keyword breaks one convention."""

    def __init__(
        self,
        linear,
        rank,
        alpha,
        *,
        axis=1,
        scale_by_alpha=False,
        detach=True,
        rescale_bias=False,
        random_b=False,
        m_shape=None,
        adapters_in_base_dtype=False,
    ):
        super().__init__()
        self.linear = linear.requires_grad_(False)
        w = linear.weight
        low = w.dtype in (torch.bfloat16, torch.float16) and not adapters_in_base_dtype
        dtype = torch.float32 if low else w.dtype  # float32 adapters on a half base, as PEFT
        self.A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        B = torch.randn(w.shape[0], rank) if random_b else torch.zeros(w.shape[0], rank)
        self.B = nn.Parameter(B.to(dtype))
        self.m = nn.Parameter(w.detach().to(dtype).norm(dim=axis).reshape(m_shape or -1))
        self.scaling = alpha if scale_by_alpha else alpha / rank
        self.axis, self.detach, self.rescale_bias = axis, detach, rescale_bias

    def V(self):
        """W0 + s B A, in the adapters' dtype."""
        return self.linear.weight.to(self.A.dtype) + self.scaling * self.B @ self.A

    def apply(self, x, W, bias=True):
        """x W^T (+ b), computed in W's dtype and answered in x's."""
        b = self.linear.bias if bias else None
        return F.linear(x.to(W.dtype), W, None if b is None else b.to(W.dtype)).to(x.dtype)

    def forward(self, x):
        V = self.V()
        norm = V.norm(dim=self.axis, keepdim=True).clamp_min(1e-12)
        if self.detach:
            norm = norm.detach()
        k = self.m.reshape(norm.shape) / norm
        if self.rescale_bias:  # the efficient-forward bug: rescale base_layer(x), bias included
            return k.flatten() * self.apply(x, V)
        return self.apply(x, k * V)


class MergesInBaseDtype(ReferenceDoRA):
    """A correct layer whose merged_weight() computes W' in the base's dtype, step by step."""

    def merged_weight(self):
        W0 = self.linear.weight
        V = W0 + (self.scaling * self.B @ self.A).to(W0.dtype)
        k = self.m.to(W0.dtype) / V.norm(dim=1)
        return k[:, None] * V


class MatrixInputsOnly(ReferenceDoRA):
    """A correct layer that rejects (batch, seq, in) inputs, which nn.Linear accepts."""

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError(f"expected (batch, in_features), got {tuple(x.shape)}")
        return super().forward(x)


def frozen_magnitude(linear, rank, alpha):
    """A factory function: the reference layer with m left out of training."""
    layer = ReferenceDoRA(linear, rank, alpha)
    layer.m.requires_grad_(False)
    return layer


class Float32Norm(ReferenceDoRA):
    """Takes the norm in float32 whatever its dtype: float64 cannot tell conventions apart."""

    def forward(self, x):
        V = self.V()
        norm = V.float().norm(dim=1, keepdim=True).detach()  # an "upcast", a downcast here
        return self.apply(x, self.m[:, None] * V / norm)


class LoRA(nn.Module):  # the rasbt-style adapter: A (in, r), B (r, out), scaling alpha
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.randn(in_dim, rank) / rank**0.5)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha


class RasbtStyleDoRA(nn.Module):
    """As widely copied: norm over dim=0 (per input column), scaling alpha, no detach."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRA(linear.in_features, linear.out_features, rank, alpha)
        self.m = nn.Parameter(linear.weight.norm(p=2, dim=0, keepdim=True))

    def forward(self, x):
        V = self.linear.weight + self.lora.alpha * (self.lora.A @ self.lora.B).T
        return F.linear(x, self.m * V / V.norm(p=2, dim=0, keepdim=True), self.linear.bias)


class LogMagnitudeDoRA(ReferenceDoRA):
    """A correct DoRA that keeps log m: its magnitude cannot be identified by value."""

    def __init__(self, linear, rank, alpha):
        super().__init__(linear, rank, alpha)
        self.log_m = nn.Parameter(self.m.detach().log())
        del self.m

    def forward(self, x):
        V = self.V()
        norm = V.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()
        return self.apply(x, self.log_m.exp()[:, None] * V / norm)


VARIANTS = {  # factory, the checks it must fail
    "reference": (ReferenceDoRA, set()),
    "m as (out, 1)": (functools.partial(ReferenceDoRA, m_shape=(-1, 1)), set()),  # official code
    "norm per column": (functools.partial(ReferenceDoRA, axis=0), {2}),
    "scaling alpha": (functools.partial(ReferenceDoRA, scale_by_alpha=True), {4}),
    "no detach": (functools.partial(ReferenceDoRA, detach=False), {6}),
    "rescaled bias": (functools.partial(ReferenceDoRA, rescale_bias=True), {5}),
    "non-zero initial B": (functools.partial(ReferenceDoRA, random_b=True), {1}),
    # check 7 catches what no convention check does
    "2-D inputs only": (MatrixInputsOnly, {7}),
    "m not trained": (frozen_magnitude, {7, 11}),
    # + 8: no floor on the norm, so an all-zero weight column gives 0 / 0 = NaN; + 11: A and B
    # in float32, m in the base's dtype: on a bfloat16 base the layer does not even run
    "rasbt style": (RasbtStyleDoRA, {2, 4, 6, 8, 11}),
    "adapters in bfloat16": (functools.partial(ReferenceDoRA, adapters_in_base_dtype=True), {11}),
    "merges in bfloat16": (MergesInBaseDtype, {12}),
}


def failed(report):
    return set(report.failed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_fails_exactly_its_own_checks(variant, dtype):
    """In float64 and, with tolerances from float32's rounding, in float32."""
    factory, expected = VARIANTS[variant]
    report = check_dora(factory, dtype=dtype)
    assert report.identified, report.problem
    assert failed(report) == expected, str(report)
    assert report.passed == (not expected)
    assert report.exit_status == expected_status(expected)


def test_report_lines_say_what_a_failure_means():
    report = check_dora(RasbtStyleDoRA)
    lines = str(report).splitlines()
    assert lines[0] == "DoRA conformance: RasbtStyleDoRA"
    assert lines[1] == "  found A = lora.A (11, 3), B = lora.B (3, 7), m = m (1, 11)"
    checks = [line for line in lines[2:-2] if not line.startswith(" " * 4)]  # wrapped: indented
    assert len(checks) == len(CHECKS)  # one entry per check, then the verdict
    assert all(len(line) <= 96 for line in lines)  # fits a notebook's output area
    by_number = {r.number: r for r in report.results}
    assert "INPUT column" in by_number[2].detail and "norm(dim=0)" in by_number[2].detail
    assert "scaled by alpha (= 5), not alpha / rank" in by_number[4].detail
    assert "not detached" in by_number[6].detail
    assert "all-zero weight column" in by_number[8].detail
    # check 7 passes only under the conventions the other checks measured, and says so
    assert "magnitude per input column, scaling alpha, norm not detached" in by_number[7].detail
    # the wrong variant is named for what it does, and where it is found
    for n in (2, 4):
        assert "catid/dora and rasbt/dora-from-scratch's merged layer" in by_number[n].detail
    assert "per-input-column norm" in by_number[2].detail
    assert (
        " ".join(lines[-2:]).split()
        == (
            "5 of 12 checks fail: not DoRA as the paper defines it (2); differs from the official "
            "code and PEFT (4, 6); robustness (8, 11), 3 not applicable (9, 10, 12)"
        ).split()
    )
    assert checks[0].startswith("  pass 1. base function at init [convention]: ")
    assert checks[1].startswith("  FAIL 2. magnitude axis [paper]: ")
    assert checks[7].startswith("  FAIL 8. zero rows, low precision [robustness]: ")
    assert all(line.startswith(("  pass ", "  FAIL ", "  skip ")) for line in checks)
    assert report.exit_status == 1  # the most serious kind decides


def test_messages_name_the_variant():
    details = {
        v: {r.number: r.detail for r in check_dora(VARIANTS[v][0]).results}
        for v in ("rescaled bias", "non-zero initial B")
    }
    assert "rescaled by m / ||V||" in details["rescaled bias"][5]
    assert "B is not zero at initialisation" in details["non-zero initial B"][1]


@pytest.mark.parametrize(
    "factory, says, check_1",
    [
        (LogMagnitudeDoRA, "neither the row norms of W0 nor its column norms", "pass"),
        ("LinearWithLoRA", "this looks like LoRA, not DoRA", "pass"),
        (lambda linear: linear, "must take (linear, rank, alpha)", "fail"),
    ],
    ids=["log-magnitude", "lora", "wrong-signature"],
)
def test_unidentifiable_layers_run_check_1_only_and_say_why(nb, factory, says, check_1):
    if isinstance(factory, str):
        factory = getattr(nb, factory)
    report = check_dora(factory)
    assert not report.identified and says in report.problem
    assert report.exit_status == 2 and not report.passed
    status = {r.number: r.status for r in report.results}
    assert all(status[n] == "skip" for n in ALL - {1})
    assert status[1] == check_1
    assert f"cannot check this layer: {report.problem}" in " ".join(str(report).split())


NOTEBOOK_LAYERS = {
    "LinearWithDoRA": {},
    "DoRALinear-factored": {"factored_norm": True},
    "DoRALinear-dense": {"factored_norm": False},
}
LOW_PRECISION = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("key", list(NOTEBOOK_LAYERS))
def test_notebook_layers_pass_every_check(nb, key, dtype):
    """Dropout (9) and merged_weight() (10) included; below float64 within rounding, said so.
    Part I's LinearWithDoRA is the definition alone: no floor on the norm (robustness, 8) and
    no dropout argument (9 does not apply), and it keeps A, B and m in the base's dtype, so on a
    bfloat16 base m does not train (11) and its merge rounds along the way (12); everything the
    paper and PEFT define passes."""
    factory = functools.partial(getattr(nb, key.split("-")[0]), **NOTEBOOK_LAYERS[key])
    report = check_dora(factory, dtype=dtype)
    if key == "LinearWithDoRA":
        assert failed(report) == {8, 11, 12} and report.exit_status == 4, str(report)
        assert [r.number for r in report.results if r.status == "skip"] == [9]
        return
    assert report.passed, str(report)
    assert all(r.status == "pass" for r in report.results), str(report)
    assert report.adapter == "A = lora.A (3, 11), B = lora.B (7, 3), m = m (7,)"
    rounding = [r for r in report.results if r.within_rounding]
    assert bool(rounding) == (dtype != torch.float64)
    name = str(dtype).removeprefix("torch.")
    assert all(f"(within {name} rounding: " in " ".join(str(r).split()) for r in rounding)


def test_notebook_layer_without_detach_fails_check_6_only(nb):
    report = check_dora(functools.partial(nb.DoRALinear, detach_norm=False))
    assert failed(report) == {6}, str(report)
    assert report.exit_status == 3


def test_a_layer_computing_in_float32_is_checked_with_float32_tolerances():
    """Built in float64, it takes the norm in float32: checked, not refused, and it says so."""
    report = check_dora(Float32Norm)
    assert report.identified and report.precision == "float32"
    assert failed(report) == {8}, str(report)  # and it has no floor on the norm
    assert "computes in float32 with float64 parameters" in " ".join(str(report).split())


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_peft_dora_passes_all_but_8_on_zero_rows(dtype):
    """PEFT 0.21.2 divides by the raw row norm: an all-zero row of W0 gives 0 / 0 = NaN at init.

    A robustness finding only (exit status 4). If a later PEFT floors the norm, this test fails
    and should then expect all checks to pass. PEFT's dropout (9) and merge_and_unload / merge /
    unmerge (10) pass, in float64 exactly and in float32 and bfloat16 within rounding; on a
    bfloat16 base PEFT 0.15 cannot merge its float32 adapters (10 fails there).
    """
    reason = peft_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    report = check_dora(peft_dora_factory, dtype=dtype)
    assert report.adapter == (
        "A = model.base_model.model.0.lora_A.default.weight (3, 11), "
        "B = model.base_model.model.0.lora_B.default.weight (7, 3), "
        "m = model.base_model.model.0.lora_magnitude_vector.default.weight (7,)"
    )
    detail = {r.number: r.detail for r in report.results}
    assert "all-zero weight row gives NaN or inf in the output at initialisation" in detail[8]
    import peft

    old_peft = tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 21)
    if dtype == torch.bfloat16 and old_peft and 10 in failed(report):
        # PEFT 0.15 (requirements.txt's floor) keeps the adapters in float32 on a bfloat16 base,
        # as 0.21 does, but its merge then multiplies the two dtypes and raises
        assert failed(report) == {8, 10}, str(report)
        assert "must have the same dtype" in detail[10]
        return
    assert failed(report) == {8}, str(report)
    assert report.exit_status == 4
    assert "merge_and_unload(), merge() in place, unmerge()" in detail[10]
    assert report.summary().startswith("1 of 12 checks fail: robustness (8)")


# ---- dropout (9) and merging (10): variants that fail exactly that check ---------------------


class DropoutDoRA(ReferenceDoRA):
    """The reference layer with dropout=p: PEFT's placement, or one of two common mistakes."""

    def __init__(self, linear, rank, alpha, dropout=0.0, placement="peft"):
        super().__init__(linear, rank, alpha)
        self.p, self.placement = dropout, placement

    def forward(self, x):
        if not self.training or self.placement == "ignored":
            return super().forward(x)
        x_d = F.dropout(x, self.p)
        if self.placement == "base too":  # y = DoRA(dropout(x))
            return super().forward(x_d)
        V = self.V()
        W = self.m[:, None] * V / V.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()
        delta = W - self.linear.weight.to(W.dtype)
        return self.linear(x) + self.apply(x_d, delta, bias=False)  # PEFT's semantics


class MergingDoRA(ReferenceDoRA):
    """The reference layer with merged_weight() and an in-place merge() / unmerge()."""

    def __init__(self, linear, rank, alpha, bug=None):
        super().__init__(linear, rank, alpha)
        self.bug, self.merged_delta = bug, None

    def merged_weight(self):
        V = self.V()
        if self.bug == "merged_weight is V":
            return V
        return self.m[:, None] * V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def merge(self):
        with torch.no_grad():
            self.merged_delta = self.merged_weight() - self.linear.weight
            self.linear.weight += self.merged_delta

    def unmerge(self):
        with torch.no_grad():
            if self.bug != "unmerge keeps W'":
                self.linear.weight -= self.merged_delta
            self.merged_delta = None

    def forward(self, x):
        return self.linear(x) if self.merged_delta is not None else super().forward(x)


ADAPTER_VARIANTS = {  # factory, the checks it must fail
    "dropout as in PEFT": (DropoutDoRA, set()),
    "dropout on the base path too": (functools.partial(DropoutDoRA, placement="base too"), {9}),
    "dropout ignored": (functools.partial(DropoutDoRA, placement="ignored"), {9}),
    "merge and unmerge": (MergingDoRA, set()),
    # + 12: W' = V misses the whole magnitude change, so on a bfloat16 base the merge loses more
    # of the update than rounding does
    "merged_weight() returns V": (
        functools.partial(MergingDoRA, bug="merged_weight is V"),
        {10, 12},
    ),
    "unmerge keeps W'": (functools.partial(MergingDoRA, bug="unmerge keeps W'"), {10}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(ADAPTER_VARIANTS))
def test_dropout_and_merge_variants_fail_exactly_their_check(variant, dtype):
    factory, expected = ADAPTER_VARIANTS[variant]
    report = check_dora(factory, dtype=dtype)
    assert failed(report) == expected, str(report)
    status = {r.number: r.status for r in report.results}
    applicable = 9 if "dropout" in variant else 10
    assert status[applicable] == ("fail" if expected else "pass")
    assert status[19 - applicable] == "skip"  # the other one does not apply
    detail = {r.number: r.detail for r in report.results}[applicable]
    says = {
        "dropout on the base path too": "the base path sees the dropped input too",
        "dropout ignored": "the layer ignores p (the divergence reported as fsdp_qlora #68",
        "merged_weight() returns V": "merged_weight() is off by",
        "unmerge keeps W'": "after unmerge() the base weight is off by",
    }
    assert variant not in says or says[variant] in " ".join(detail.split())


def test_fast_and_leaves_the_global_random_state_alone(nb):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    start = time.perf_counter()
    report = check_dora(nb.DoRALinear)
    seconds = time.perf_counter() - start
    assert report.passed
    assert seconds < 15, seconds  # about 0.3 s on a 2-core CPU
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

USER_MODULE = textwrap.dedent(
    """
    import functools
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn


    class MyDoRA(nn.Module):
        def __init__(self, linear, rank, alpha, scaling=None):
            super().__init__()
            self.linear = linear
            w = linear.weight  # float32 adapters on a bfloat16 or float16 base, as PEFT
            dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
            self.A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=dtype))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=dtype))
            self.m = nn.Parameter(w.detach().to(dtype).norm(dim=1))
            self.scaling = alpha / rank if scaling is None else scaling

        def forward(self, x):
            V = self.linear.weight.to(self.A.dtype) + self.scaling * self.B @ self.A
            norm = V.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()
            b = self.linear.bias
            b = None if b is None else b.to(V.dtype)
            return F.linear(x.to(V.dtype), self.m[:, None] * V / norm, b).to(x.dtype)


    def alpha_scaled(linear, rank, alpha):
        return MyDoRA(linear, rank, alpha, scaling=alpha)


    class PerColumn(MyDoRA):
        def __init__(self, linear, rank, alpha):
            super().__init__(linear, rank, alpha)
            self.m = nn.Parameter(linear.weight.detach().norm(dim=0))

        def forward(self, x):
            V = self.linear.weight + self.scaling * self.B @ self.A
            norm = V.norm(dim=0, keepdim=True).clamp_min(1e-12).detach()
            return F.linear(x, self.m * V / norm, self.linear.bias)


    class Unfloored(MyDoRA):
        def forward(self, x):
            V = self.linear.weight + self.scaling * self.B @ self.A
            return F.linear(x, self.m[:, None] * V / V.norm(dim=1, keepdim=True).detach(),
                            self.linear.bias)


    class MyLoRA(nn.Module):
        def __init__(self, linear, rank, alpha):
            super().__init__()
            self.linear = linear
            self.A = nn.Parameter(torch.randn(rank, linear.in_features))
            self.B = nn.Parameter(torch.zeros(linear.out_features, rank))

        def forward(self, x):
            return self.linear(x) + x @ self.A.T @ self.B.T
    """
)


def run_cli(*args, cwd):
    """``python -m dora_tutorial.check_dora ARGS`` from ``cwd``, this repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dora_tutorial.check_dora", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_layers.py").write_text(USER_MODULE)
    return folder


@pytest.mark.parametrize(
    "target, status, says",
    [
        ("my_layers.py:MyDoRA", 0, "9 of 12 checks pass, 3 not applicable (9, 10, 12)"),
        ("my_layers:alpha_scaled", 3, "FAIL 4. scaling"),  # module.path:factory_function
        ("my_layers.py:PerColumn", 1, "FAIL 2. magnitude axis [paper]"),
        ("my_layers.py:Unfloored", 4, "FAIL 8. zero rows, low precision [robustness]"),
        ("my_layers.py:MyLoRA", 2, "this looks like LoRA, not DoRA"),
    ],
)
def test_cli_exit_status(user_dir, target, status, says):
    result = run_cli(target, cwd=user_dir)
    assert result.returncode == status, result.stdout + result.stderr
    assert says in result.stdout and not result.stderr


def test_cli_help_documents_the_exit_status_per_kind(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for says in (
        "0 every check passes",
        "1 a check of kind 'paper' fails",
        "3 a check of kind",
        "4 only checks of kind 'robustness' fail",
        "2 usage error",
    ):
        assert says in out


def test_cli_json_gives_every_check_kind_result_and_numbers(user_dir, monkeypatch, capsys):
    monkeypatch.chdir(user_dir)
    try:
        status = main(["--json", "--dtype", "float32", "my_layers.py:alpha_scaled"])
    finally:
        sys.modules.pop("my_layers", None)
    out = capsys.readouterr().out
    data = json.loads(out)  # nothing but the JSON on stdout
    assert status == data["exit_status"] == 3
    (report,) = data["reports"]
    assert report["dtype"] == "float32" and report["failed"] == {
        "paper": [],
        "convention": [4],
        "robustness": [],
    }
    checks = {c["number"]: c for c in report["checks"]}
    assert set(checks) == ALL
    assert checks[4]["kind"] == "convention" and checks[4]["result"] == "fail"
    assert checks[4]["kind_meaning"] == "differs from the official code and PEFT"
    assert math.isclose(checks[4]["numbers"]["scaling"], 5, rel_tol=1e-5)
    assert checks[3]["result"] == "pass" and checks[3]["within_rounding"]
    assert 0 < checks[3]["numbers"]["error"] <= checks[3]["numbers"]["tolerance"]
    assert checks[9]["result"] == "skip"


@pytest.mark.parametrize(
    "target, says",
    [
        ("missing.py:MyDoRA", "no such file: missing.py"),
        (
            "my_layers.py:MyDora",
            "my_layers.py has no 'MyDora'; did you mean 'MyDoRA'? "
            "It defines: MyDoRA, MyLoRA, PerColumn, Unfloored, alpha_scaled",
        ),
        ("my_layers.py", "expected FILE.py:NAME or module:NAME, got 'my_layers.py'"),
        ("no_such_module:MyDoRA", "no module named 'no_such_module'"),
    ],
)
def test_cli_usage_errors_say_what_is_wrong(user_dir, monkeypatch, capsys, target, says):
    monkeypatch.chdir(user_dir)
    try:
        assert main([target]) == 2
    finally:
        sys.modules.pop("my_layers", None)
    out = capsys.readouterr()
    assert out.err.startswith("check_dora.py: error: ") and says in out.err and not out.out


def test_cli_without_a_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "give FILE.py:NAME or module:NAME, or --peft" in capsys.readouterr().err


def test_import_has_no_side_effects():
    code = "import sys; import dora_tutorial.check_dora; print(sorted({'peft'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "[]\n" and not result.stderr


# ---- PEFT that imports but fails in use ----------------------------------------------------

STAND_IN_PEFT = """
__version__ = "0.0-stand-in"


class LoraConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def get_peft_model(model, config):
    raise ImportError("Found an incompatible version of torchao (stand-in)")
"""


@pytest.fixture
def broken_peft(monkeypatch):
    """A stand-in peft that imports fine and raises ImportError when used (an old torchao)."""
    module = types.ModuleType("peft")
    exec(STAND_IN_PEFT, module.__dict__)
    monkeypatch.setitem(sys.modules, "peft", module)
    check_dora_module.peft_unavailable_reason.cache_clear()
    yield module
    check_dora_module.peft_unavailable_reason.cache_clear()


def test_peft_that_fails_in_use_is_reported_not_crashed(broken_peft, capsys):
    reason = peft_unavailable_reason()
    assert reason.startswith("peft imports but fails in use (ImportError: Found an incompatible")
    assert main(["--peft"]) == 2  # nothing was checked
    out = capsys.readouterr()
    assert out.err == f"PEFT's DoRA: skipped: {reason}\n" and not out.out


def test_peft_that_fails_in_use_does_not_stop_the_other_check(broken_peft, capsys):
    status = main(["--json", "--peft", f"{Path(__file__)}:ReferenceDoRA"])
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert status == 0 == data["exit_status"]  # the layer that was checked decides
    assert [r["name"] for r in data["reports"]] == ["ReferenceDoRA"]
    assert data["skipped"] == [out.err.strip()] and "fails in use" in out.err


STAND_IN_PEFT_MODEL = """
class PeftModel:
    @classmethod
    def from_pretrained(cls, model, directory):
        raise ImportError("Found an incompatible version of torchao (stand-in)")
"""


def notebook_cell(holding):
    """The source of the notebook's one code cell that contains ``holding``."""
    import nbformat

    cells = nbformat.read(REPO / "DoRA.ipynb", as_version=4).cells
    (source,) = [c.source for c in cells if c.cell_type == "code" and holding in c.source]
    return source


def test_notebook_peft_section_goes_on_when_peft_fails_in_use(nb, tmp_path, capsys):
    """Section 16's cell with a PEFT that imports and raises ImportError when used: one line."""
    import helpers

    peft = types.ModuleType("peft")  # its code runs as the package "peft"
    exec(STAND_IN_PEFT_MODEL, peft.__dict__)
    pretrained = helpers.make_mlp((6, 5, 3), seed=0)
    dora_model = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 2, 4)
    namespace = {
        "helpers": helpers,
        "torch": torch,
        "Path": Path,
        "PeftModel": peft.PeftModel,
        "tmp": types.SimpleNamespace(name=str(tmp_path)),
        "dora_model": dora_model,
        "pretrained": pretrained,
        "rotated": types.SimpleNamespace(test_x=torch.randn(4, 6)),
        "LinearWithDoRA": nb.LinearWithDoRA,
        "RANK": 2,
        "ALPHA": 4,
    }
    cell = notebook_cell('optional_part("the comparison with PEFT")')
    exec(cell, namespace)  # raises if the guard is missing
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ours -> PEFT directory: adapter_config.json, adapter_model.safetensors"
    assert " ".join(lines[1:]).startswith(
        "Skipping the comparison with PEFT: PEFT fails in use (ImportError: Found an incompatible"
    )
    assert notebook_cell('optional_part("the PEFT round trip")')  # section 18's round trip


def test_optional_part_swallows_only_errors_raised_inside_peft(capsys):
    import helpers

    peft = types.ModuleType("peft")
    exec(STAND_IN_PEFT, peft.__dict__)
    with helpers.optional_part("the stand-in") as part:
        peft.get_peft_model(nn.Linear(2, 2), peft.LoraConfig())
        raise AssertionError("not reached")
    assert isinstance(part.skipped, ImportError)
    assert capsys.readouterr().out.startswith("Skipping the stand-in: PEFT fails in use")
    with pytest.raises(ValueError, match="our own bug"):
        with helpers.optional_part("the stand-in"):
            raise ValueError("our own bug")  # this project's errors are not hidden


def test_checks_are_numbered_once_each_in_order():
    """Reports, exit statuses and the docs name checks by number: 1..N, each once."""
    assert [c.number for c in CHECKS] == list(range(1, len(CHECKS) + 1))
