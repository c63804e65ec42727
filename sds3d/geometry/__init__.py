"""The lowest layer: cameras, view buckets and shading, shared by world, nerf, teachers and eval."""
