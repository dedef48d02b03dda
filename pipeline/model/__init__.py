"""The model: the frozen SNAC codec, the 48 kHz decoder, LoRA adapters, the demo codec."""
