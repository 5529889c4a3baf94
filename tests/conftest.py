"""pytest setup, once for every test file: the repository root (the reading path, loaders/ and
experiments/) and tests/ itself (the DDP worker scripts) on the import path."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
