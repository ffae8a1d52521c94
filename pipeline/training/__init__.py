"""Training the projectors on the cached tokens: the loop's pieces (`loop`), resume checkpoints
(`checkpoints`), the λ/α grid trained in one pass (`stacked`, `ablation`) and provenance (which run
a projectors file comes from, and whether the current inputs are its inputs).

May import `evaluation` and below.
"""
