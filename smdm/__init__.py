"""smdm: masked diffusion language models next to matched autoregressive models."""

import os

# Idle OpenMP workers sleep instead of spinning. libgomp (torch's CPU OpenMP) spins 300000 times by default before
# sleeping; on a machine where another process holds a core, those spins steal the time slices the other thread
# needs, and a 2-thread training step on 2 cores ran 45% slower (benchmarks/threads.py, docs/benchmarks.md).
# libgomp reads this once, when torch loads it, so it must be set before the first `import torch`; setdefault keeps
# a user's own OMP_WAIT_POLICY. Importing torch before smdm (e.g. in a notebook) keeps libgomp's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
