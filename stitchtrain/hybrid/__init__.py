"""Hybrid VFMs: a trained stitch and its two frozen parents as one ``featcache`` encoder.

``featcache.load_encoder("stitched:DIR[#STAGE]")`` resolves here (featcache's
``ENCODER_SCHEMES`` names ``encoder.load_stitched`` as a string): ``parts`` reads a fit run
dir, ``exported`` an export folder, ``encoder`` is the ``HybridEncoder``, ``export`` writes
an export folder (``stitchtrain export``) and ``onnx_model`` its ``model.onnx``.
"""
