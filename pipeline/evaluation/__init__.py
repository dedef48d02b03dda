"""What users look at: held-out evaluation, the report, inference (resynth, decode, the library's
Decoder and streams)."""
