"""Training the projectors on the cached tokens: the loop's pieces (`loop`), resume checkpoints
(`checkpoints`), the λ/α grid trained in one pass (`stacked`, `ablation`) and provenance (which run
a projectors file comes from, and whether the current inputs are its inputs), and the record that
makes a projectors file usable on its own (`usage`: meta["use"]).

May import `evaluation` and below.
"""
