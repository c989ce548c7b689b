"""The oldest versions the requirements files admit, as exact pins, for the floor run.

    python -m tools.floors requirements.txt requirements-dev.txt [torch==2.8.0 ...]

Every requirement states one floor, ``name>=X`` (a pin is its own floor, upper bounds are dropped,
``-r`` lines skipped): what the files promise is tested. A ``name==X`` argument replaces a pin.
"""

import re
import sys
from pathlib import Path

_REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<spec>[<>=!~,.\s\w*+]*)")


def _parse(line: str) -> tuple[str, str, str] | None:
    """(PEP 503 key, name, specifier) of a requirement; None for a blank, comment or -r line."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-r "):
        return None
    match = _REQUIREMENT.fullmatch(text)
    if match is None:  # extras, markers, URLs, options: not needed here, so not supported
        raise ValueError(f"unsupported requirement line: {line.strip()!r}")
    key = re.sub(r"[-_.]+", "-", match["name"]).lower()  # huggingface_hub is Huggingface-Hub
    return key, match["name"], match["spec"].replace(" ", "")


def floor_pins(lines: list[str], overrides: list[str] = ()) -> list[str]:
    """``name==floor`` for every requirement, in file order, then the overrides applied."""
    pins: dict[str, str] = {}
    for line in lines:
        if parsed := _parse(line):
            key, name, spec = parsed
            floors = re.findall(r">=([^,]+)", spec) or re.findall(r"^==([^,]+)$", spec)
            if len(floors) != 1:
                raise ValueError(f"{name}: needs exactly one '>=' floor, got {line.strip()!r}")
            pins[key] = f"{name}=={floors[0]}"
    for override in overrides:
        parsed = _parse(override)
        if not parsed or not parsed[2]:
            raise ValueError(f"an override needs a version, e.g. torch==2.8.0: {override!r}")
        pins[parsed[0]] = parsed[1] + parsed[2]
    return list(pins.values())


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    lines = [line for a in argv if a.endswith(".txt") for line in Path(a).read_text().splitlines()]
    print("\n".join(floor_pins(lines, [a for a in argv if not a.endswith(".txt")])))


if __name__ == "__main__":
    main(sys.argv[1:])
