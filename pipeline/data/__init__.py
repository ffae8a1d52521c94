"""Datasets and images: class names, image decoding (`images`), the augmented and evaluation views
(`augment`), a photo's aspect-ratio-keeping view for `segment` / `query` (`dense_view`), the dataset readers (`datasets`), downloading and layout checks (`download`,
`datacheck`) and the generated planted-signal data of the smoke profile (`synthetic`).

May import `config`, `errors`, `files`. Knows nothing of models, stores or training.
"""
