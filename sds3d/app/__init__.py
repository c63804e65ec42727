"""The Gradio web app: `sds3d app` (or `python apps/gradio_app.py`) serves it.

Generate (prompt, teacher, loss, preset, seed, steps, advanced settings; live preview, progress,
Cancel and Resume; the mesh in a 3D viewer, the turntable, the contact sheet, metrics against the
world's ground truth and downloads), Runs (every run folder under the output root) and Students
(a few-step student beside its teacher). Built on `sds3d.pipelines.text_to_3d.generate`: the page
runs exactly what `sds3d generate` runs. Needs the `app` extra (gradio); imported lazily so that
the rest of sds3d works without it.
"""

from __future__ import annotations


def build_app(out_root="outputs", max_runs: int = 1, warm: bool = True):
    """The gr.Blocks page over `out_root` (see sds3d.app.ui.SDS3DApp)."""
    from .ui import build_app as build

    return build(out_root, max_runs=max_runs, warm=warm)


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, out_root="outputs", max_runs: int = 1,
           block: bool = True, warm: bool = True):
    """Serve the page (see sds3d.app.ui.launch)."""
    from .ui import launch as serve

    return serve(host=host, port=port, share=share, out_root=out_root, max_runs=max_runs, block=block, warm=warm)


__all__ = ["build_app", "launch"]
