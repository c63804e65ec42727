"""The Khronos glTF validator (npm package `gltf-validator`, run through node) on a GLB file.

`make validator` installs it into the repository's git-ignored `.node/` folder; `SDS3D_GLTF_VALIDATOR`
may point at another copy of the package folder. Without node or the package, `find_validator`
returns None: exports still work, only the check is skipped (tests fail instead when
SDS3D_REQUIRE_VALIDATOR=1, as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

REPO_VALIDATOR = Path(__file__).resolve().parents[2] / ".node" / "node_modules" / "gltf-validator"

# Reads the file, validates it, prints the report's issue summary as JSON (the validator's own
# format: numErrors, numWarnings, numInfos, numHints, messages [{code, message, severity, pointer}]).
_SCRIPT = """
const fs = require('fs');
const validator = require(process.argv[1]);
validator.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), {maxIssues: 0, writeTimestamp: false})
  .then((report) => { process.stdout.write(JSON.stringify(report.issues)); },
        (error) => { process.stderr.write(String(error)); process.exit(3); });
"""


def find_validator() -> tuple[str, Path] | None:
    """(node executable, gltf-validator package folder), or None when either is missing."""
    node = shutil.which("node")
    package = Path(os.environ.get("SDS3D_GLTF_VALIDATOR") or REPO_VALIDATOR)
    if node is None or not (package / "package.json").exists():
        return None
    return node, package


def validate_gltf(path: str | os.PathLike, timeout: float = 120.0) -> dict:
    """The validator's issues for a .glb or .gltf file: {"numErrors", "numWarnings", "numInfos",
    "numHints", "messages": [...]}. Raises RuntimeError when the validator is not installed."""
    found = find_validator()
    if found is None:
        raise RuntimeError("the glTF validator is not installed: run `make validator` (needs node and npm)")
    node, package = found
    result = subprocess.run([node, "-e", _SCRIPT, str(package), str(Path(path).resolve())], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"gltf-validator could not read {path}: {result.stderr.strip().splitlines()[:1]}")
    return json.loads(result.stdout)
