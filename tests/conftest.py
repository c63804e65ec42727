import os

# torch's OpenMP threads spin while waiting; on a 2-core machine shared with another process that
# makes small ops 10-40x slower. Passive waiting must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
