"""`kxl fetch`: what a run needs, from the hub."""
