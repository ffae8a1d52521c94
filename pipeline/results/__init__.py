"""What a run leaves for people: results files with their provenance (`outputs`), skipped
evaluations (`skips`), the Markdown report (`report`) and plots (`plots`).

May import `training` and below.
"""
