"""`evaluate_views`: does a teacher draw an object as the asked camera sees it (the bound on the
geometry score distillation can build)? Checked with the oracle, the exact denoiser of the world's
renders, which is camera-conditioned by construction, against the world's own renderer."""

import torch

from sds3d.teachers.oracle import OracleTeacher
from sds3d.training.teacher import evaluate_views


def _oracle(tmp_path, camera_sigma_deg: float) -> OracleTeacher:
    return OracleTeacher(resolution=32, views_per_bucket=48, n_uncond=16, elevation_range=(10.0, 20.0),
                         distance_range=(2.75, 2.75), fovy_range=(45.0, 45.0), camera_sigma_deg=camera_sigma_deg,
                         cache_dir=tmp_path, use_disk_cache=False)


def test_an_exact_camera_conditioned_denoiser_draws_the_asked_view(tmp_path):
    """The oracle's samples are world renders from near the asked camera: their silhouettes overlap
    the truth from that camera (IoU > 0.8; 0.87 to 0.93 measured), and on the objects that look different a quarter turn
    round (a table, a dumbbell; not a cube) they overlap it much better than the turned truth."""
    record, images = evaluate_views(_oracle(tmp_path, 5.0), ["a table", "a dumbbell", "a cube"], steps=10,
                                    guidance=1.0, samples_per_view=1)
    assert images.shape == (12, 3, 32, 32)
    assert record["turn_dependent_prompts"] == ["a table", "a dumbbell"]
    rows = {r["prompt"]: r for r in record["per_prompt"]}
    assert all(r["silhouette_iou"] > 0.8 for r in rows.values()), rows
    assert record["view_gain"] > 0.45, record["view_gain"]  # 0.61 measured
    # the cube looks alike from both cameras: no gain counted there
    assert abs(rows["a cube"]["silhouette_iou"] - rows["a cube"]["silhouette_iou_turned"]) < 0.05, rows["a cube"]


def test_the_camera_adds_to_what_the_view_suffix_says(tmp_path):
    """The oracle without camera conditioning (camera_sigma 0) knows only the prompt's view suffix, a
    bucket of 90 degrees of azimuth: its samples of the table and the dumbbell come from anywhere in
    the bucket, so they fit the asked camera worse than the camera-conditioned oracle's do."""
    prompts = ["a table", "a dumbbell"]
    text_only, _ = evaluate_views(_oracle(tmp_path, 0.0), prompts, steps=10, guidance=1.0, samples_per_view=4)
    camera, _ = evaluate_views(_oracle(tmp_path, 5.0), prompts, steps=10, guidance=1.0, samples_per_view=4)
    # measured: IoU 0.59 and gain 0.24 from the suffix alone, 0.87 and 0.59 with the camera
    assert camera["silhouette_iou"] > text_only["silhouette_iou"] + 0.2
    assert camera["view_gain"] > text_only["view_gain"] + 0.2
