"""`index.html` of a batch folder: a static gallery of its runs that opens from disk (file://).

One card per prompt line: the run's contact sheet (8 views above the ground truth), its turntable,
its metrics against the ground truth, links to the meshes, summary, config and log, and the state
with the error line of a failed run. Only relative links and inline CSS: the folder can be moved,
zipped or served as it is. Rewritten with the manifest after every change of state.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..io import atomic_write_text

INDEX = "index.html"
LINKS = ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.mp4", "summary.md", "config.yaml", "loss_curve.png")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1em; }
.card { background: white; border: 1px solid #ddd; border-radius: 8px; padding: 0.8em; }
.card img { width: 100%; image-rendering: pixelated; }
.card video { width: 48%; }
.state { font-weight: bold; padding: 0 0.4em; border-radius: 4px; }
.done { background: #d4f4d4; } .failed { background: #f8d0d0; } .running { background: #fff2b3; }
.queued, .interrupted { background: #e4e4e4; }
table { border-collapse: collapse; } td { padding: 0 0.6em 0 0; }
.error { color: #a00; font-family: monospace; }
"""


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _card(batch_dir: Path, record: dict) -> str:
    name = record["run_dir"]
    run = batch_dir / name
    state = record["state"]
    parts = [f'<div class="card" id="line-{record["line"]}">',
             f'<div>line {record["line"]} <span class="state {state}">{state}</span> '
             f'<b>{html.escape(record["prompt"])}</b></div>']
    if record.get("overrides"):
        settings = " ".join(f"{k}={v}" for k, v in record["overrides"].items())
        parts.append(f"<div><code>{html.escape(settings)}</code></div>")
    if (run / "contact_sheet.png").is_file():
        parts.append(f'<a href="{name}/contact_sheet.png"><img src="{name}/contact_sheet.png" '
                     f'alt="8 views of the NeRF, the ground truth below"></a>')
    if (run / "turntable.mp4").is_file():
        parts.append(f'<video src="{name}/turntable.mp4" controls loop muted playsinline></video>')
    if (run / "loss_curve.png").is_file():
        parts.append(f'<img src="{name}/loss_curve.png" alt="loss curve" style="width:48%">')
    metrics = record.get("metrics") or {}
    rows = [("IoU", metrics.get("iou_mean")), ("colour error", metrics.get("color_error_mean")),
            ("Chamfer", metrics.get("chamfer")), ("train s", metrics.get("train_seconds")),
            ("seconds", record.get("seconds")), ("threads", record.get("threads"))]
    cells = "".join(f"<tr><td>{label}</td><td>{_number(value)}</td></tr>" for label, value in rows if value is not None)
    if cells:
        parts.append(f"<table>{cells}</table>")
    if record.get("error"):
        parts.append(f'<div class="error">{html.escape(record["error"])}</div>')
    links = [f'<a href="{name}/{file}">{file}</a>' for file in LINKS if (run / file).is_file()]
    log = batch_dir / "logs" / f"{record['line']:03d}.log"
    if log.is_file():
        links.append(f'<a href="logs/{log.name}">log</a>')
    if links:
        parts.append("<div>" + " · ".join(links) + "</div>")
    parts.append("</div>")
    return "\n".join(parts)


def index_html(batch_dir: Path, records: list[dict]) -> str:
    counts = {}
    for record in records:
        counts[record["state"]] = counts.get(record["state"], 0) + 1
    tally = ", ".join(f"{n} {state}" for state, n in counts.items())
    title = html.escape(f"sds3d batch {batch_dir.name}")
    cards = "\n".join(_card(batch_dir, record) for record in records)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{title}</h1><p>{len(records)} line(s): {html.escape(tally)}. "
            f"Records: <a href=\"manifest.jsonl\">manifest.jsonl</a>.</p>\n<div class=\"grid\">\n{cards}\n</div></body></html>\n")


def write_index_html(batch_dir: Path, records: list[dict]) -> Path:
    path = Path(batch_dir) / INDEX
    atomic_write_text(path, index_html(Path(batch_dir), records))
    return path
