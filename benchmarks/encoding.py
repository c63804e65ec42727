"""Hash grid encoders on the CPU: our fused C++ op vs our pure-torch encoder vs nerfstudio's torch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encoding.py [--points 131072] [--threads 2] [--repeats 7]

Two configurations, the same for all three encoders: "default" (16 levels x 2 features, table 2^19,
base 16, max resolution 2048) and "cpu-fast" (`CPU_FAST_ENCODING`: 6 levels, 2^17, max 64).
Timed: forward (table requires grad, as in training) and forward + backward (a fixed random
upstream gradient, in the layout each encoder's consumer produces: feature-major for ours, as
`NeRFField` runs its MLP, row-major for nerfstudio's; the table's .grad is reset to None each run,
as `zero_grad()` does), medians of `--repeats` runs after a warm-up. Ours also with the Jacobian
(normals), which nerfstudio lacks.
The table is shared (nerfstudio's (L*T, F) is our (L, T, F) flattened). Our two encoders follow
tiny-cuda-nn's grid.h (per-level scale b^l * base - 1, +0.5 offset, dense coarse levels) and the
script prints how far their features are apart (float rounding); nerfstudio uses other per-level
scales and no offset, so it computes a different function and its column compares speed only.

nerfstudio is optional (`pip install --no-deps nerfstudio==1.1.5 jaxtyping rich viser==0.2.7`);
its encoder only needs torch, so a missing viser dependency is stubbed out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads distort shared-core timings

import torch  # noqa: E402

from sds3d.nerf import hashgrid_cpp  # noqa: E402
from sds3d.nerf.encoding import HashGridEncoding  # noqa: E402
from sds3d.nerf.field import CPU_FAST_ENCODING  # noqa: E402

CONFIGS = {
    "default": dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16, max_resolution=2048),
    "cpu-fast": CPU_FAST_ENCODING,
}


def nerfstudio_hash_encoding():
    try:
        import viser.transforms  # noqa: F401  (nerfstudio's scene_box imports it)
    except Exception:  # noqa: BLE001 - viser without its own dependencies: the encoder does not use it
        viser = types.ModuleType("viser")
        viser.transforms = types.ModuleType("viser.transforms")
        sys.modules.update({"viser": viser, "viser.transforms": viser.transforms})
    try:
        from nerfstudio.field_components.encodings import HashEncoding
    except Exception as error:  # noqa: BLE001
        print(f"nerfstudio not available ({type(error).__name__}: {error}); its column is skipped")
        return None
    return HashEncoding


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(name, cfg, n_points, repeats, ns_cls):
    torch.manual_seed(0)
    ours = {b: HashGridEncoding(**cfg, backend=b) for b in ("torch", "cpp")}
    ours["cpp"].load_state_dict(ours["torch"].state_dict())
    with torch.no_grad():
        ours["torch"].table.uniform_(-1.0, 1.0)  # visible values for the agreement check
        ours["cpp"].table.copy_(ours["torch"].table)
    x = torch.rand(n_points, 3)
    d = ours["torch"].output_dim
    # Upstream gradients in the layout each consumer produces: our field runs its MLP feature-major
    # (see NeRFField), so ours get (D, N) and (D, 3, N) storage, viewed as (N, D) and (N, D, 3);
    # nerfstudio's (N, D) output feeds a row-major MLP, so it gets a contiguous (N, D).
    grad_feats = torch.randn(d, n_points).t()
    grad_feats_rows = grad_feats.contiguous()
    grad_jac = torch.randn(d, 3, n_points).permute(2, 0, 1)

    encoders = {"cpp": ours["cpp"], "torch": ours["torch"]}
    ns = None
    if ns_cls is not None:
        ns = ns_cls(num_levels=cfg["n_levels"], min_res=cfg["base_resolution"], max_res=cfg["max_resolution"],
                    log2_hashmap_size=cfg["log2_hashmap_size"], features_per_level=cfg["n_features_per_level"],
                    implementation="torch")
        with torch.no_grad():
            ns.hash_table.copy_(ours["torch"].table.reshape(-1, cfg["n_features_per_level"]))
        encoders["nerfstudio"] = ns

    with torch.no_grad():
        ref = ours["torch"](x)
        agree = {k: (enc(x) - ref).abs().max().item() for k, enc in encoders.items()}
    print(f"\n[{name}] {cfg}, {n_points} points, {torch.get_num_threads()} threads; "
          "max |features - ours(torch)|: " + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))

    def params(enc):
        return enc.table if isinstance(enc, HashGridEncoding) else enc.hash_table

    def fwd(enc):
        return lambda: enc(x)

    def fwd_bwd(enc):
        grad = grad_feats if isinstance(enc, HashGridEncoding) else grad_feats_rows

        def run():
            params(enc).grad = None
            enc(x).backward(grad)
        return run

    def fwd_jac(enc):
        return lambda: enc.forward_with_jacobian(x)

    def fwd_bwd_jac(enc):
        def run():
            enc.table.grad = None
            feats, jac = enc.forward_with_jacobian(x)
            torch.autograd.backward([feats, jac], [grad_feats, grad_jac])
        return run

    rows = [("forward", fwd, encoders), ("forward+backward", fwd_bwd, encoders),
            ("forward, Jacobian", fwd_jac, ours), ("fwd+bwd, Jacobian", fwd_bwd_jac, ours)]
    results = {}
    for label, make, encs in rows:
        for key, enc in encs.items():
            # nerfstudio's torch path takes seconds a run: fewer repeats keep the script short.
            reps = max(3, repeats // 2) if key == "nerfstudio" else repeats
            results[label, key] = median_seconds(make(enc), reps)

    header = f"{'':20s}{'ours cpp':>12s}{'ours torch':>12s}{'nerfstudio':>12s}{'torch/cpp':>11s}{'ns/cpp':>9s}"
    print(header)
    for label, _, _ in rows:
        c, t, n = (results.get((label, k)) for k in ("cpp", "torch", "nerfstudio"))
        cells = [f"{v * 1e3:10.1f}ms" if v is not None else f"{'-':>12s}" for v in (c, t, n)]
        ratios = f"{t / c:10.1f}x" + (f"{n / c:8.1f}x" if n is not None else f"{'-':>9s}")
        print(f"{label:20s}" + "".join(cells) + ratios)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=131072)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not hashgrid_cpp.available():
        sys.exit("the cpp extension is not available here: nothing to compare")
    print(f"cpp extension ready in {time.perf_counter() - t0:.1f}s ({hashgrid_cpp.build_directory()}), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    ns_cls = nerfstudio_hash_encoding()
    for name in args.configs:
        bench_config(name, CONFIGS[name], args.points, args.repeats, ns_cls)


if __name__ == "__main__":
    main()
