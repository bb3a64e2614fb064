"""ADE20K (SceneParsing, ADEChallengeData2016): its 150 class names and folder layout.

``ADE20K_CLASSES[k]`` is the class of training label ``k``, which is raw annotation value
``k + 1`` (value 0 is "other objects", ignored under ``reduce_zero_label``). The order is
objectInfo150.txt's, as mmsegmentation's ``ADE20KDataset.METAINFO["classes"]`` lists it
(mmsegmentation spells class 7 "bed " with a trailing space; here it is "bed").

The reader itself is ``featcache.data.load_dataset``, which detects ``ADE20K_SPLITS`` folders
under ``images/`` and ``annotations/`` (the layout rules are in featcache/data.py).
"""

from __future__ import annotations

__all__ = ["ADE20K_CLASSES", "ADE20K_IGNORE_VALUE", "ADE20K_OTHER", "ADE20K_SPLITS"]

# folder under images/ and annotations/ -> split name
ADE20K_SPLITS = {"training": "train", "validation": "val"}
ADE20K_IGNORE_VALUE = 255  # never in ADE20K's own annotations; mmsegmentation's ignore_index
ADE20K_OTHER = "other"  # class 0's name when reduce_zero_label is off

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
