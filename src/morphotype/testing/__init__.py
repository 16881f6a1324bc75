"""Test tooling: synthetic data with known truth and a fault-injecting loopback file server.

As ``numpy.testing``: shipped with the package for the tests and benchmarks (and anyone checking
an installation offline), never imported by the pipeline itself.

- :mod:`~morphotype.testing.movies`: :func:`synthetic_movie` (drifting nuclei under known shading).
- :mod:`~morphotype.testing.servers`: :class:`LoopbackFileServer`.
"""

from morphotype.testing.movies import synthetic_movie
from morphotype.testing.servers import FAULTS, LoopbackFileServer

__all__ = ["FAULTS", "LoopbackFileServer", "synthetic_movie"]
