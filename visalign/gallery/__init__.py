"""Score galleries of generated images and videos with rewards: table + HTML report.

``visalign.gallery.score(paths, rewards, out=..., report=...)`` is the Python API behind
``visalign score``.  Importing this package is light: the scoring machinery (torch, rewards)
loads on first use, so decoding worker processes import only Pillow and numpy.
"""

__all__ = ["score", "describe", "ScoreRun", "GalleryUsageError"]


def __getattr__(name: str):
    if name in ("score", "describe", "ScoreRun"):
        from . import api

        return getattr(api, name)
    if name == "GalleryUsageError":
        from .discover import GalleryUsageError

        return GalleryUsageError
    raise AttributeError(f"module 'visalign.gallery' has no attribute {name!r}")
