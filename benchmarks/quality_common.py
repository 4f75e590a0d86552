"""The quality studies' training, for the studies that import it by this name: :mod:`harness.training`."""

from harness.training import *  # noqa: F403
