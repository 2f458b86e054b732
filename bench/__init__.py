"""Benchmarks, run by `bul bench NAME` from the checkout.

A benchmark drives torch from several threads (each engine's model worker, a thread for the Hugging
Face baselines). With OpenMP's default wait policy a thread team that has just finished keeps spinning
on the cores the next thread needs, so whichever side runs after the other pays for it (5-15 % on two
cores). Passive waiting makes the side-by-side comparison fair. It must be set before torch loads;
a server, with a single model thread, has no reason to change it."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
