"""Training recipes for lipformer: presets, data preparation and the train loop.

The repository keeps this folder at the top level (recipes above the library); it installs as
`lipformer.training`. The library never imports it; the CLI does, lazily.
"""
