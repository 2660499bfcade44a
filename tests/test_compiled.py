"""The compiled hot path's bookkeeping: what runs is what the source says, compiled or not."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import shutil
from pathlib import Path

from service import compiled

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def package(tmp_path: Path) -> Path:
    """A copy of the hot modules' source, without compiled copies."""
    target = tmp_path / "service"
    target.mkdir()
    for name in compiled.HOT_MODULES:
        shutil.copy(compiled.PACKAGE_DIR / f"{name}.py", target / f"{name}.py")
    return target


def fake_build(target: Path, names: tuple[str, ...] = compiled.HOT_MODULES) -> None:
    """Files where a build leaves them, and its manifest of source hashes (the bytes are not a library)."""
    for name in names:
        (target / f"{name}{SUFFIX}").write_bytes(b"")
    (target / f"{compiled.GROUP}__mypyc{SUFFIX}").write_bytes(b"")
    hashes = {name: compiled._source_hash(target / f"{name}.py") for name in names}
    (target / compiled.MANIFEST).write_text(json.dumps(hashes), encoding="utf-8")


def test_no_compiled_copies_is_plain_python(tmp_path: Path) -> None:
    target = package(tmp_path)
    assert set(compiled.state(target).values()) == {"python"}
    assert compiled.summary(target) == "plain Python (no compiled modules)"


def test_copies_of_the_current_source_are_compiled(tmp_path: Path) -> None:
    target = package(tmp_path)
    fake_build(target)
    assert set(compiled.state(target).values()) == {"compiled"}
    assert compiled.summary(target) == f"compiled with mypyc ({len(compiled.HOT_MODULES)} modules)"


def test_a_source_changed_after_the_build_is_stale(tmp_path: Path) -> None:
    target = package(tmp_path)
    fake_build(target)
    with (target / "payloads.py").open("a", encoding="utf-8") as source:
        source.write("\n# edited\n")
    states = compiled.state(target)
    assert states["payloads"] == "stale"
    assert [name for name, value in states.items() if value != "compiled"] == ["payloads"]
    assert compiled.summary(target).startswith("STALE compiled modules")
    assert "payloads" in compiled.summary(target)


def test_a_copy_the_build_did_not_record_is_stale(tmp_path: Path) -> None:
    target = package(tmp_path)
    fake_build(target)
    (target / compiled.MANIFEST).unlink()
    assert set(compiled.state(target).values()) == {"stale"}


def test_a_copy_of_a_module_no_longer_compiled_is_stale(tmp_path: Path) -> None:
    target = package(tmp_path)
    fake_build(target)
    (target / f"connections{SUFFIX}").write_bytes(b"")  # an older build's: Python would import it still
    assert compiled.state(target)["connections"] == "stale"


def test_remove_leaves_plain_python(tmp_path: Path) -> None:
    target = package(tmp_path)
    fake_build(target)
    assert compiled.remove(target) == len(compiled.HOT_MODULES) + 2  # the copies, the shared library, the manifest
    assert set(compiled.state(target).values()) == {"python"}
    assert sorted(path.name for path in target.iterdir()) == sorted(f"{n}.py" for n in compiled.HOT_MODULES)


def test_what_is_imported_is_what_the_state_says() -> None:
    # The suite runs the package as it stands (conftest refuses stale copies): each hot module is the
    # compiled copy exactly when its state says compiled.
    for name, value in compiled.state().items():
        module = importlib.import_module(f"service.{name}")
        assert (module.__file__ or "").endswith(SUFFIX) == (value == "compiled"), (name, value, module.__file__)
