"""The training data of kxl-prep outputs inside sd-scripts: train_records.arrow memory-mapped
(views), as sd-scripts' own FineTuningDataset with the same batches (sdscripts)."""
