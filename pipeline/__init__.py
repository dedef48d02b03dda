"""Phase 11: a 48 kHz decoder for SNAC codes. The package is the program every Snakemake rule runs
(`python -m pipeline <command>`) and, for code that decodes in memory, a library:

    import pipeline
    dec = pipeline.load("results/phase11/final.pt")   # a model folder or final.pt; lora=, device=
    audio = dec.decode(codes)                          # [(B, T_i) LongTensors], coarsest first -> (B, 1, samples)
    s = dec.stream(batch=1)                            # s.push(codes) -> audio so far; s.flush() -> the rest

Importing the package imports nothing heavy (the Snakefile imports pipeline.settings at parse
time): torch and the model come with the first `load`.
"""


def load(path, lora=None, device="auto"):
    """A trained model (folder or final.pt; `lora`: a lora_weights.safetensors applied on top) as a
    Decoder (pipeline/evaluation/decoder.py): `.decode(codes)`, `.stream(batch)`, `.geometry`,
    `.model` (eval mode, noise blocks as trained). `device`: "auto" (CUDA when there is one),
    "cpu", "cuda:1", ..."""
    from .evaluation.decoder import load as _load
    return _load(path, lora=lora, device=device)
