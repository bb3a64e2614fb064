"""``stitchtrain report``: the paper's figures and tables from sweep results.

Reads one or more sweep output dirs (``results.parquet``; transfer outputs found below them
are read too) and writes PNG plots, ``report.md`` (Markdown tables, image links) and
``index.html`` (the same, rendered from templates/report.html.j2) under the report dir. Per
dataset D (file names start with ``D_``), per direction s->t (its own runs only) and per
pair {a, b}:

  distance_<s>_to_<t>.png     layer (circles) and final (squares) feature distance against
                              stitch position, LFM vs FFM                      (Figure 2)
  accuracy_<s>_to_<t>.png     test metric against position, one line per objective, each
                              encoder's linear probe as a horizontal line        (Figures 3, 4)
  self_stitch_<a>_<b>.png     stitched (solid) vs self-stitch (dashed) per direction (Figure 5)
  cka_<a>_<b>.png             linear CKA of the two encoders at each position against the
                              stitched metric: similarity does not predict stitchability
  cka_heatmap_<a>_<b>.png     CKA between every pair of swept positions

Every PNG has its data beside it, same name with .csv: the x and y arrays handed to
matplotlib (columns panel, series, x, y; one row per plotted point; the heatmap: layer_a,
layer_b, cka), written by the same call that plots them (``_draw``).

The page opens with "Models" (``models``): each sweep key's encoder (a hybrid by its label),
fingerprint, and its stores' dataset and split, read from the stores the results record.

Tables in the layout of the paper's Tables 1 (TLT by initialisation), 2 (self-stitch vs
stitched across datasets), 3 (stitch families), 4 (task-specific vs task-agnostic FFM, when
transfer outputs exist), 6 (LFM vs FFM under linear probing) and 12 (prediction analysis), and
Figure 2's distances. Numbers are percentages of the test metric (accuracy, or mIoU for
segmentation), averaged over seeds (``mean ± std`` when there are several). The "main"
objective (Figure 5, Tables 2, 3, 12) is ffm+tlt when swept, else the last swept objective; the
main stitch family is mlp when swept, else the first.

The report dir is new, empty or an earlier report, and is replaced whole (``folder``).
"""
