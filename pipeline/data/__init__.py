"""Data in: manifests, audio, precompute, the Zarr cache, the demo corpus, training segments."""
