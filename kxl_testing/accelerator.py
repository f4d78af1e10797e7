"""accelerate's Accelerator as kxl's patches see it when tests and benches set up a dataset
outside a training run: one process, the state hooks kept, prepare() handing its objects back."""
from __future__ import annotations


class FakeAccelerator:
    num_processes, process_index = 1, 0

    def __init__(self):
        self.hooks = []

    def register_save_state_pre_hook(self, hook):
        self.hooks.append(hook)

    register_load_state_pre_hook = register_save_state_pre_hook

    def prepare(self, *objects):
        return objects
