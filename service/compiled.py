"""The compiled hot path: which modules ``make`` compiles with mypyc, and whether the compiled copies are current.

A delivery's own work is Python: parsing, the HMAC call, routing, the call's arguments, the answer.
Compiled with mypyc (the compiler mypy ships) the same source runs on about an eighth fewer instructions
per delivery (``bench/``). The modules below are compiled in place: next to ``payloads.py`` lies
``payloads.cpython-*.so``, which Python imports instead of the source. Without the compiled copies
(``NATIVE=0``, no C compiler) the same source runs as plain Python: behaviour is the same, only slower.

A compiled copy built from other source than what is on disk would run old code, so the build records the
SHA-256 of each source it compiled, and ``state()`` compares: the app logs it at start-up and the test
suite refuses to run stale copies.

``python -m service.compiled build|remove|check`` (``make native`` runs ``build``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The modules a delivery spends its time in, in import order. Not ``errors.py``: other modules subclass its
# exceptions, and compiled code does not accept instances of a plain-Python subclass of a compiled class. Not
# ``connections.py`` (mypyc cannot compile one of its loops; a warm delivery only reads its cache) nor
# ``scriptline.py`` (little work per delivery, and its tests replace methods, which compiled classes refuse).
HOT_MODULES = (
    "keys",
    "models",
    "signature",
    "payloads",
    "metrics",
    "deadlines",
    "queue",
    "ingest",
    "http",
)
GROUP = "_native"  # the shared library all compiled modules live in: service/_native__mypyc.*.so
MANIFEST = "_compiled.json"  # {"module": "sha256 of the source it was compiled from", ...}


# Run in a child process: mypyc and setuptools are build tools (the dev extra), not imported by the service.
# Arguments: the module paths, the shared library's name, a scratch directory.
_BUILD_SCRIPT = """
import sys
from mypyc.build import mypycify
from setuptools import setup
paths, group, tmp = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
extensions = mypycify(paths, group_name=group, target_dir=tmp + "/c")
build = ["build_ext", "--inplace", "--build-temp", tmp + "/t", "--build-lib", tmp + "/l"]
setup(name="qbo-webhooks-native", ext_modules=extensions, script_args=["-q", *build])
"""


def _source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiled_files(package_dir: Path) -> list[Path]:
    """Every compiled file in ``package_dir`` (the package has no extension modules but these) and the manifest."""
    found = [
        path
        for path in package_dir.iterdir()
        if any(path.name.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    ]
    manifest = package_dir / MANIFEST
    return found + ([manifest] if manifest.exists() else [])


def state(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Each hot module's state: ``compiled`` (a current compiled copy), ``python`` (none) or ``stale``
    (a compiled copy of other source, or one the build did not record)."""
    try:
        recorded: dict[str, str] = json.loads((package_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    states = {}
    for name in HOT_MODULES:
        has_copy = any((package_dir / f"{name}{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)
        if not has_copy:
            states[name] = "python"
        elif recorded.get(name) == _source_hash(package_dir / f"{name}.py"):
            states[name] = "compiled"
        else:
            states[name] = "stale"
    # A compiled copy of a module that is no longer compiled (an older build's) would still be imported.
    for path in _compiled_files(package_dir):
        name = path.name.split(".", 1)[0]
        if path.name != MANIFEST and name not in states and name != f"{GROUP}__mypyc":
            states[name] = "stale"
    return states


def summary(package_dir: Path = PACKAGE_DIR) -> str:
    """One line for logs and benchmark results."""
    states = state(package_dir)
    stale = [name for name, value in states.items() if value == "stale"]
    compiled = [name for name, value in states.items() if value == "compiled"]
    if stale:
        return f"STALE compiled modules (their source changed since the build): {', '.join(stale)}; run `make native`"
    if not compiled:
        return "plain Python (no compiled modules)"
    if len(compiled) < len(HOT_MODULES):
        return f"compiled with mypyc: {', '.join(compiled)} (the rest plain Python)"
    return f"compiled with mypyc ({len(compiled)} modules)"


def remove(package_dir: Path = PACKAGE_DIR) -> int:
    """Delete the compiled copies (the package then runs as plain Python); returns how many files went."""
    files = _compiled_files(package_dir)
    for path in files:
        path.unlink()
    return len(files)


def build(package_dir: Path = PACKAGE_DIR, *, force: bool = False) -> bool:
    """Compile ``HOT_MODULES`` in place, unless the copies are already current. Returns whether the package now
    runs compiled; on any failure the copies are removed (plain Python) and the reason printed."""
    if not force and all(value == "compiled" for value in state(package_dir).values()):
        print("compiled modules are up to date")
        return True
    remove(package_dir)
    hashes = {name: _source_hash(package_dir / f"{name}.py") for name in HOT_MODULES}
    root = package_dir.parent
    with tempfile.TemporaryDirectory(prefix="qbo-native-") as tmp:
        paths = [f"{package_dir.name}/{name}.py" for name in HOT_MODULES]
        group = f"{package_dir.name}.{GROUP}"
        print(f"compiling {len(paths)} modules with mypyc (under a minute) ...", flush=True)
        env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, *paths, group, tmp],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        remove(package_dir)
        print(f"warning: compiling failed; the service runs as plain Python:\n{(done.stdout + done.stderr)[-3000:]}")
        return False
    (package_dir / MANIFEST).write_text(json.dumps(hashes, indent=1) + "\n", encoding="utf-8")
    # The compiled package must import as a whole; if it does not, plain Python is the safe answer.
    check = subprocess.run(
        [sys.executable, "-c", f"import {package_dir.name}.app"], cwd=root, capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        remove(package_dir)
        print(f"warning: the compiled modules do not import; the service runs as plain Python:\n{check.stderr[-3000:]}")
        return False
    print(summary(package_dir))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.compiled", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "remove", "check"])
    parser.add_argument("--force", action="store_true", help="build even when the compiled copies are current")
    args = parser.parse_args(argv)
    if args.action == "build":
        build(force=args.force)
        return 0  # plain Python is a working install: the warning says why it is not compiled
    if args.action == "remove":
        print(f"removed {remove()} compiled files; the service runs as plain Python")
        return 0
    print(summary())
    return 1 if any(value == "stale" for value in state().values()) else 0


if __name__ == "__main__":
    sys.exit(main())
