"""LoRA factors <-> PEFT adapters, and the SVD helpers of the server step."""
