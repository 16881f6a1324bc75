"""morphotype: single-cell phenotype prediction from nucleus morphology."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("morphotype")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
