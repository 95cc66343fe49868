"""One client's local LoRA training and its evaluation: base models, generation, Rouge-L."""
