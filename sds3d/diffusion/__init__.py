"""The diffusion layer: noise schedule, the Teacher protocol and the solvers, knowing nothing of 3D."""
