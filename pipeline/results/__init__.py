"""What a run leaves for people: results files with their provenance (`outputs`), skipped
evaluations (`skips`), the Markdown report (`report`), plots (`plots`), and for `segment` /
`query` the overlays' label panels (`overlays`) and output names that never collide (`names`).

May import `training` and below.
"""
