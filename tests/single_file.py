"""The tests' single-file checkpoints: the product's conversion (worker/singlefile.py), re-exported so fixtures
and tests keep importing it from here."""
from worker.singlefile import write_single_file_checkpoint

__all__ = ["write_single_file_checkpoint"]
