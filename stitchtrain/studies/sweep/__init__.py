"""``stitchtrain sweep``: a grid of stitch runs plus their baselines, one table of results.

A sweep config (TOML or YAML) names the encoders' stores and the grid::

    dataset = "fmow"                      # optional label for tables (default: from the stores)

    [stores]                              # encoder key -> train store (test store found beside it)
    dinov2 = "stores/train/dinov2-l-*.zarr"   # a glob must match exactly one store
    siglip2 = { train = "stores/train/siglip2-l-....zarr", test = "stores/test/siglip2-l-....zarr" }
    clip = { train = "...", weights = "clip-l.safetensors" }  # fit's --source/--target-weights

    [grid]
    pairs = [["dinov2", "siglip2"]]       # default: every pair of distinct encoders
    both_directions = true                # each pair in both directions (default true)
    positions = [2, 6, 10, 14, 18, 22]
    objectives = ["lfm", "ffm", "ffm+tlt"]
    stitches = ["mlp"]
    seeds = [0]

    [fit]                                 # FitConfig fields shared by every run
    lrs = [1e-3, 5e-3, 1e-2]              # or lr = ... (fit --lr / --lrs)
    epochs = 100

    [baselines]                           # added automatically (paper sections 3 and 4.1)
    probe = true                          # linear probe of each encoder (per seed)
    self_stitch = true                    # source->source and target->target at each position
    self_stitch_objectives = ["ffm+tlt"]  # default: the grid's objectives

Relative store paths are relative to the config file. Each grid point is one ``fit`` (or
``probe_store``) run in ``OUT/runs/<point id>`` and one task: in sequence by default, or one
``client.submit`` per point on a Dask distributed cluster (``local``, ``local:N`` or a
scheduler address). A finished point leaves ``sweep_point.json`` in its run dir; re-running
the sweep skips it. A failing point becomes a row with status "failed" and its error. The table
``OUT/results.csv`` / ``OUT/results.parquet`` (one row per point, in grid order: the point, its
metrics and its ``config.*``) is rewritten after every point and at the end.
"""
