"""Suite-wide settings, applied before any test imports torch. This folder is on ``sys.path`` (pytest puts a
conftest's folder there), so test files share helpers through ``tests/helpers.py`` (``from helpers import ...``)."""
import os

# OpenMP's default busy-waiting makes torch crawl when other processes (Ray trials, DDP workers, dataloader
# workers) share the two cores of a CI machine; passive waiting costs nothing when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
