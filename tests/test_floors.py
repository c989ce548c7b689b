"""tools/floors.py turns every floor of the requirements files into the exact pin the floor run
installs, and refuses a requirement it could not test at its oldest version."""

from pathlib import Path

import pytest

from tools.floors import floor_pins

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "lines, overrides, pins",
    [
        (
            ["# note", "", "torch>=2.6.0  # why", "Huggingface_Hub >= 0.25.0, <3", "numpy>=1.24"],
            [],
            ["torch==2.6.0", "Huggingface_Hub==0.25.0", "numpy==1.24"],
        ),
        (["-r requirements.txt", "ruff==0.17.6"], [], ["ruff==0.17.6"]),  # a pin is its own floor
        (
            ["torch>=2.6.0", "huggingface_hub>=0.25.0"],
            ["torch==2.8.0", "huggingface-hub==0.3", "six==1.0"],
            ["torch==2.8.0", "huggingface-hub==0.3", "six==1.0"],
        ),
    ],
)
def test_floors_become_exact_pins(lines, overrides, pins):
    assert floor_pins(lines, overrides) == pins


@pytest.mark.parametrize(
    "lines, overrides",
    [
        (["torch"], []),
        (["torch<3"], []),
        (["torch>=2.6,>=2.7"], []),
        (["torch[cuda]>=2.6"], []),
        (["torch>=2.6; os_name"], []),
        (["torch>=2.6.0"], ["torch"]),
    ],
)
def test_a_requirement_without_one_plain_floor_is_refused(lines, overrides):
    with pytest.raises(ValueError):
        floor_pins(lines, overrides)


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_the_requirements_files_have_their_floors(name):
    lines = [line for line in (REPO / name).read_text().splitlines() if line.split("#")[0].strip()]
    assert len(floor_pins(lines)) == len([line for line in lines if not line.startswith("-r")])
