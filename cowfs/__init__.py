"""cowfs: a copy-on-write layered filesystem served by FUSE, with an image store around it."""

__version__ = "0.1.0"
