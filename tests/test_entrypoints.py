"""``aegis_edge_cli.entrypoints`` finds what ``importlib.metadata`` finds, without loading it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aegis_edge_cli import entrypoints
from aegis_edge_cli.entrypoints import EntryPoint, entry_points


def _dist(root: Path, dirname: str, entry_points_txt: str | None) -> None:
    dist = root / dirname
    dist.mkdir(parents=True)
    name = dirname.split("-", maxsplit=1)[0]
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    if entry_points_txt is not None:
        (dist / "entry_points.txt").write_text(entry_points_txt)


def _metadata(group: str) -> list[EntryPoint]:
    return [
        EntryPoint(e.name, e.value, e.group) for e in importlib.metadata.entry_points(group=group)
    ]


def test_every_group_of_this_environment_matches_importlib_metadata() -> None:
    groups = importlib.metadata.entry_points().groups
    assert "aegis.cli" in groups
    for group in groups:
        assert entrypoints._read(group) == _metadata(group), group


def test_path_order_shadowing_comments_and_sections_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    text = (
        "# a comment\n"
        "[aegis_edge.tools]\n"
        "  disk = pkg.tools:Disk  \n"
        "mem=pkg.tools:Mem [extra]\n"
        "\n"
        "[other]\n"
        "disk = not.this:One\n"
    )
    _dist(first, "Plug_In-1.0.dist-info", text)
    # The same distribution later on the path (normalised name): shadowed, as importlib does.
    _dist(second, "plug.in-2.0.dist-info", "[aegis_edge.tools]\nshadowed = x:y\n")
    _dist(second, "other-1.0.egg-info", "[aegis_edge.tools]\negg = egg.mod:Tool\n")
    _dist(second, "no_entry_points-1.0.dist-info", None)
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    found = entry_points("aegis_edge.tools")
    assert found == _metadata("aegis_edge.tools")
    assert [(e.name, e.value) for e in found] == [
        ("disk", "pkg.tools:Disk"),
        ("mem", "pkg.tools:Mem [extra]"),
        ("egg", "egg.mod:Tool"),
    ]


def test_a_path_object_on_sys_path_is_read_like_a_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dist(tmp_path, "pathlike-1.0.dist-info", "[aegis_edge.tools]\np = pmod:T\n")
    monkeypatch.setattr(sys, "path", [tmp_path, *sys.path])
    found = entry_points("aegis_edge.tools")
    assert found == _metadata("aegis_edge.tools")
    assert EntryPoint("p", "pmod:T", "aegis_edge.tools") in found


def test_a_zip_on_the_path_goes_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\n")
        zf.writestr("zipped-1.0.dist-info/entry_points.txt", "[aegis_edge.tools]\nz = zmod:T\n")
    monkeypatch.syspath_prepend(str(archive))
    assert EntryPoint("z", "zmod:T", "aegis_edge.tools") in entry_points("aegis_edge.tools")


def test_load_follows_the_attribute_path() -> None:
    assert EntryPoint("x", "os.path:join", "g").load() is __import__("os").path.join
    assert EntryPoint("x", "os.path", "g").load() is __import__("os").path
    with pytest.raises(ValueError, match="malformed value"):
        EntryPoint("x", "not a value!", "g").load()


def test_the_aegis_root_runs_a_command_without_importlib_metadata() -> None:
    code = (
        "import sys\n"
        "from aegis_edge_cli import main\n"
        "try:\n"
        "    main(['edge', 'status', '--state-dir', sys.argv[1]])\n"
        "finally:\n"
        "    cut = ('importlib.metadata', 'email', 'zipfile')\n"
        "    print(sorted(m for m in cut if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent-aegis-state"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "not enrolled" in proc.stderr
    assert proc.stdout.strip() == "[]"
