"""Data in (the data floor, see pipeline/__init__.py): manifests, audio, precompute, the Zarr
cache, alignment checks, the demo corpus, training segments. Imports no model code."""
