"""The layer order of docs/ARCHITECTURE.md, checked on every import of every module.

Each package of sds3d sits in one layer; a module may import its own package, packages of lower
layers, and the base modules (io). It may not import a higher layer, nor a peer package of its
own layer. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sds3d"

# Lowest first. One entry per layer; packages in the same entry are peers.
LAYERS: list[tuple[str, ...]] = [
    ("io", "settings", "precision", "threads"),
    ("geometry", "diffusion"),
    ("world", "nerf"),
    ("teachers", "eval"),
    ("training",),
    ("distill",),
    ("export",),
    ("pipelines", "config"),
    ("app",),
    ("cli",),  # above app: `sds3d app` launches it
    ("__main__",),
]
# Peers that may import each other, with the reason (keep this empty unless a reason is written here).
ALLOWED_PEER_IMPORTS: dict[tuple[str, str], str] = {
    # GenerateConfig is the pipeline's config; the pipeline reads it and config imports nothing of pipelines.
    ("pipelines", "config"): "the text-to-3D loop is configured by GenerateConfig",
}


def layer_of(component: str) -> int:
    for index, names in enumerate(LAYERS):
        if component in names:
            return index
    raise KeyError(component)


def component_of(module: str) -> str | None:
    """'sds3d.nerf.render' -> 'nerf'; 'sds3d' (the package itself) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sds3d" else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every sds3d import in the file, at any depth (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sds3d"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # `from . import x`: x may be a submodule
                    found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
                    continue
            else:
                target = node.module or ""
            if target.split(".")[0] == "sds3d":
                found.append((node.lineno, target))
    return found


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def violations() -> list[str]:
    bad = []
    for path in all_modules():
        source = component_of(module_name(path))
        if source is None:
            continue
        for line, target in imports_of(path):
            dest = component_of(target)
            if dest is None or dest == source:
                continue
            rel = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if layer_of(dest) > layer_of(source):
                bad.append(f"{rel}: {source} (layer {layer_of(source)}) imports {target} (layer {layer_of(dest)}): upward")
            elif layer_of(dest) == layer_of(source) and (source, dest) not in ALLOWED_PEER_IMPORTS \
                    and (dest, source) not in ALLOWED_PEER_IMPORTS:
                bad.append(f"{rel}: {source} imports its peer {target}")
            elif layer_of(dest) == layer_of(source) and (dest, source) in ALLOWED_PEER_IMPORTS:
                bad.append(f"{rel}: {source} imports {target}, against the allowed direction {dest} -> {source}")
    return bad


def test_every_package_has_a_layer():
    components = {component_of(module_name(p)) for p in all_modules()} - {None}
    unknown = []
    for c in sorted(components):
        try:
            layer_of(c)
        except KeyError:
            unknown.append(c)
    assert not unknown, f"packages without a layer (add them to LAYERS and docs/ARCHITECTURE.md): {unknown}"


def test_no_import_runs_against_the_layer_order():
    bad = violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function, written relatively, is found."""
    fake = tmp_path / "sds3d"
    (fake / "nerf").mkdir(parents=True)
    (fake / "nerf" / "__init__.py").write_text("")
    (fake / "nerf" / "bad.py").write_text("def f():\n    from ..teachers import load_teacher\n    return load_teacher\n")
    (fake / "world").mkdir()
    (fake / "world" / "__init__.py").write_text("")
    (fake / "world" / "peer.py").write_text("import sds3d.nerf.field\n")
    (fake / "geometry").mkdir()
    (fake / "geometry" / "__init__.py").write_text("")
    (fake / "geometry" / "ok.py").write_text("from ..io import atomic_path\nfrom . import cameras\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    bad = violations()
    assert any("nerf/bad.py:2" in b and "upward" in b for b in bad), bad
    assert any("world/peer.py:1" in b and "peer" in b for b in bad), bad
    assert not any("geometry/ok.py" in b for b in bad), bad


@pytest.mark.parametrize("module", ["sds3d.geometry.cameras", "sds3d.diffusion.solvers", "sds3d.nerf.render",
                                    "sds3d.training.loop"])
def test_low_layers_import_without_the_high_ones(module):
    """Importing a low layer does not drag in teachers, distill or pipelines (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (f"import sys, {module}\n"
            "high = [m for m in sys.modules if m.startswith(('sds3d.pipelines', 'sds3d.distill', 'sds3d.app', 'sds3d.cli'))]\n"
            "print(high)\nsys.exit(1 if high else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
