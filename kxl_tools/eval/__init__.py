"""`kxl eval`: the Epsilon card's own benchmark (CCIP over the most frequent characters),
rerun on any checkpoint: prompts -> generate -> score -> report (see docs/eval.md)."""
