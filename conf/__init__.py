"""Hydra configs of lomo-train (a package, so Hydra finds them in an installed wheel)."""
