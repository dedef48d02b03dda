"""Phase 11: a 48 kHz decoder for the codes of a 24 kHz codec (SNAC, Mimi). The package is the program every Snakemake rule runs
(`python -m pipeline <command>`) and, for code that decodes in memory, a library:

    import pipeline
    dec = pipeline.load("results/phase11/final.pt")   # a model folder or final.pt; lora=, device=
    audio = dec.decode(codes)                          # [(B, T_i) LongTensors], coarsest first -> (B, 1, samples)
    s = dec.stream(batch=1)                            # s.push(codes) -> audio so far; s.flush() -> the rest

Importing the package imports nothing heavy (the Snakefile imports pipeline.settings at parse
time): torch and the model come with the first `load`.

Layout: floors that only go down. A module imports modules of its own floor or a lower one, never
a higher one (tests/test_layers.py parses every import, function-level ones included):

  CLI         `__main__` (the commands), `bench`, `gpucheck`, `configdiff`, and `load` here
  evaluation  what users look at: evaluate, report, infer (resynth, decode), the library's
              Decoder and streams, chunked encode/decode, codes as users hand them in
  training    the trainer and what it calls: the decoder path's precision and checkpointing
              (stages), groups, losses, the spectral blocks they share with the metrics, the
              metrics (checkpoint selection uses them; evaluation reports them), discriminators,
              figures (TensorBoard's and the report's spectrograms), checkpoints, the memory
              estimate, the demo codec's training
  model       codec families behind one seam (model/codecs/: snac, mimi), the 48 kHz models,
              LoRA, the project's Snake
  data        manifests, audio, precompute, the Zarr cache, alignment checks, segments, the demo
              corpus
  ground      what every floor needs: geometry (a codec's time geometry), gpus (claiming GPUs,
              pick_device), settings (config and schema defaults), locks, ui (console, progress)

Data never imports model code: where it needs a codec (precompute encodes, the alignment checks
encode and decode) the command layer loads one and passes the object in, and data asks it only
for the seam's methods (geometry_at, fingerprint, encode, decode, context, noise_disabled). So the
cache code runs without torch models imported, and a codec family is added without touching it.
"""


def load(path, lora=None, device="auto"):
    """A trained model (folder or final.pt; `lora`: a lora_weights.safetensors applied on top) as a
    Decoder (pipeline/evaluation/decoder.py): `.decode(codes)`, `.stream(batch)`, `.geometry`,
    `.model` (eval mode, noise blocks as trained). `device`: "auto" (CUDA when there is one),
    "cpu", "cuda:1", ..."""
    from .evaluation.decoder import load as _load
    return _load(path, lora=lora, device=device)
