"""kxl compare / merge / inspect: LoKr files and SDXL single-file checkpoints, streamed."""
