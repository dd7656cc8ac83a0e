"""tensorrt-stubs (10.13) as mypy can read them. The wheel installs `tensorrt/__init__.pyi` and
`tensorrt_bindings/*.pyi` without a `py.typed` marker (mypy skips them) and a few signatures that
are not Python (a parameter named `in`; a parameter without a default after defaulted ones), which
stop mypy at the first one. `stub_dir(tmp)` copies them into a MYPYPATH folder, where each such
signature (all on plugin or legacy layer methods vpexport does not call) becomes `(*args, **kwargs)`
with its return type kept. None when tensorrt-stubs is not installed."""

from __future__ import annotations

import ast
import re
import shutil
from importlib import metadata
from pathlib import Path

_DEF = re.compile(r"^(\s*)def (\w+)\((.*)\)( -> .*)?:(.*)$")


def _fixed_line(line: str) -> str:
    m = _DEF.match(line)
    if not m:
        return line
    try:
        ast.parse(line.strip() + ("" if line.rstrip().endswith("...") else "\n    ..."))
        return line
    except SyntaxError:
        indent, name, _params, ret, rest = m.groups()
        return f"{indent}def {name}(self, *args, **kwargs){ret or ''}:{rest}"


def stub_dir(tmp: Path) -> Path | None:
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        return None
    out = Path(tmp) / "trt-stubs"
    for f in dist.files or []:
        if f.suffix != ".pyi" or f.parts[0] not in ("tensorrt", "tensorrt_bindings"):
            continue
        src = Path(str(dist.locate_file(f)))
        dst = out / Path(*f.parts)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("\n".join(_fixed_line(x) for x in src.read_text().splitlines()) + "\n")
    return out if (out / "tensorrt" / "__init__.pyi").is_file() else None
