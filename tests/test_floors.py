"""requirements.txt states a floor for every package, and tools/floors.py pins exactly those."""

from pathlib import Path

import pytest

from tools.floors import floor_pins

REPO = Path(__file__).resolve().parents[1]


REQUIREMENTS = (REPO / "requirements.txt").read_text().splitlines()


def test_every_requirement_has_a_floor_and_torch_is_never_pinned():
    pins = floor_pins(REQUIREMENTS)  # raises for a line without exactly one ">="
    assert len(pins) == sum(1 for line in REQUIREMENTS if line.split("#")[0].strip())
    assert {"torch", "torchvision", "peft", "transformers", "scipy"} <= {
        pin.split("==")[0] for pin in pins
    }
    for line in REQUIREMENTS:
        assert "==" not in line.split("#")[0], f"an exact pin in requirements.txt: {line}"


def test_floor_pins_turn_floors_into_exact_versions():
    lines = ["# comment", "", "torch>=2.6.0  # why", "Huggingface_Hub >= 0.25.0, <3", "numpy>=1.24"]
    assert floor_pins(lines) == ["torch==2.6.0", "Huggingface_Hub==0.25.0", "numpy==1.24"]


def test_overrides_replace_the_package_they_name_or_add_one():
    lines = ["torch>=2.6.0", "huggingface_hub>=0.25.0"]
    pins = floor_pins(lines, ["torch==2.8.0", "huggingface-hub==0.30.0", "six==1.16.0"])
    assert pins == ["torch==2.8.0", "huggingface-hub==0.30.0", "six==1.16.0"]


def test_the_dev_requirements_have_floors_and_one_exact_pin_the_linter():
    lines = (REPO / "requirements-dev.txt").read_text().splitlines()
    pins = floor_pins(lines)
    assert "ruff==" + pins[[p.split("==")[0] for p in pins].index("ruff")].split("==")[1] in pins
    exact = [line for line in lines if "==" in line.split("#")[0]]
    assert [line.split("==")[0] for line in exact] == ["ruff"]
    assert floor_pins(["-r requirements.txt", "ruff==0.17.6"]) == ["ruff==0.17.6"]


@pytest.mark.parametrize(
    "line", ["torch", "torch<3", "torch>=2.6,>=2.7", "torch[cuda]>=2.6", "torch>=2.6; os_name"]
)
def test_lines_without_one_plain_floor_are_refused(line):
    with pytest.raises(ValueError):
        floor_pins([line])


def test_an_override_needs_a_version():
    with pytest.raises(ValueError, match="needs a version"):
        floor_pins(["torch>=2.6.0"], ["torch"])
