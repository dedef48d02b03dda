"""The model floor: codec families behind one seam (codecs/: SNAC, Mimi) and their 48 kHz models,
LoRA adapters, the project's Snake."""
