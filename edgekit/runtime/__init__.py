"""The edge runtime: load a bundle and run it. Imports numpy and the runtimes, never torch code."""

from edgekit.runtime.manifest import Manifest
from edgekit.runtime.session import Session, load

__all__ = ["Manifest", "Session", "load"]
