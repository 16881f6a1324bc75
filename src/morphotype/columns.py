"""Names of the single-cell table's shared columns, defined once.

Every module that reads or writes the single-cell table, the model tables or the predictions
names these columns through the constants here (CellProfiler's ``Metadata_`` prefix for
everything that is not a measured feature).
"""

from __future__ import annotations

METADATA_PREFIX = "Metadata_"  # every non-feature column

CELL_ID = "Metadata_CellID"  # one nucleus: "<file_id>_<object number>", unique in a table
IMAGE_ID = "Metadata_ImageID"  # one image (plate + well + site/frame); LOIO holds out by it
IMAGE = "Metadata_Image"  # path of the image file the nucleus was measured in
FILE_ID = "Metadata_FileID"  # the samplesheet's file_id of that image
OBJECT_NUMBER = "Metadata_ObjectNumber"  # label of the nucleus in its mask
MATCH_DISTANCE = "Metadata_MatchDistance"  # pixels from the annotated centre to the nucleus
PHENOTYPE = "Metadata_Phenotype"  # annotated class (NA: unlabelled)
NEGCON = "Metadata_Negcon"  # true for negative-control cells (the z-score reference)

CENTRE_X = "Nuclei_Location_Center_X"  # nucleus centroid in image pixels (CellProfiler's name)
CENTRE_Y = "Nuclei_Location_Center_Y"
