"""Training a stitch layer: the fit's config, the trainer (setup and the stage loop), its
checkpoints, shared stages, run-dir files, heads and encoders. Imports nothing above it
(``stitchtrain.evaluate`` and ``stitchtrain.pipeline`` compose it with evaluation)."""
