"""Small helpers shared by the ADM fork (``guided_diffusion``), the run package (``sampling``) and the
evaluator (``evaluations``): npz image batches, atomic files, hashing and launcher detection.

It imports nothing from the rest of the project and only numpy from outside the standard library, so
every layer above may depend on it.
"""
