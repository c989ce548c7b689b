"""The oldest versions requirements.txt admits, as exact pins, for the floor run.

    python -m tools.floors requirements.txt requirements-dev.txt   # one "name==floor" per line
    python -m tools.floors requirements.txt torch==2.8.0 ...       # another version of a package

Every requirement must state a floor, ``name>=X`` (an exact pin is its own floor; an upper bound
is dropped; ``-r`` lines are skipped): what the files promise is exactly what is tested.
Arguments replace the pin of the package they name, to check other combinations.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<spec>[<>=!~,.\s\w*+]*)")


def _canonical(name: str) -> str:
    """PEP 503 name: pip treats ``huggingface_hub`` and ``Huggingface-Hub`` as one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(line: str) -> tuple[str, str] | None:
    """(name, specifier) of one requirements line, None for a blank or comment line."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-r "):
        return None
    match = _REQUIREMENT.fullmatch(text)
    if match is None:  # extras, markers, URLs, options: not needed here, so not supported
        raise ValueError(f"unsupported requirement line: {line.strip()!r}")
    return match["name"], match["spec"].replace(" ", "")


def floor_pins(lines: list[str], overrides: list[str] = ()) -> list[str]:
    """``name==floor`` for every requirement, in file order, then the overrides applied."""
    pins: dict[str, str] = {}
    for line in lines:
        parsed = _parse(line)
        if parsed is None:
            continue
        name, spec = parsed
        floors = re.findall(r">=([^,]+)", spec) or re.findall(r"^==([^,]+)$", spec)
        if len(floors) != 1:
            raise ValueError(f"{name}: needs exactly one '>=' floor, got {line.strip()!r}")
        pins[_canonical(name)] = f"{name}=={floors[0]}"
    for override in overrides:
        parsed = _parse(override)
        if parsed is None or not parsed[1]:
            raise ValueError(f"an override needs a version, e.g. torch==2.8.0: {override!r}")
        pins[_canonical(parsed[0])] = "".join(parsed)
    return list(pins.values())


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    files = [a for a in argv if a.endswith(".txt")]
    lines = [line for f in files for line in Path(f).read_text().splitlines()]
    print("\n".join(floor_pins(lines, [a for a in argv if not a.endswith(".txt")])))


if __name__ == "__main__":
    main(sys.argv[1:])
