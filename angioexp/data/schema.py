"""The researcher's raw layout: ``index.csv`` columns (docs/design.md#raw-layout). One row per annotated frame."""

REQUIRED_COLUMNS = (
    "case_id",  # unique per row
    "patient_id",  # a patient never spans two splits
    "split",  # train / val / test
    "cine_path",  # .npy, T×H×W, uint8 or uint16, relative to the CSV's folder
    "frame_index",  # the annotated frame of the cine
    "mask_path",  # .npy, H'×W' binary full-tree label (e.g. a DeepSA pseudo-label)
)
OPTIONAL_COLUMNS = (
    "segment_mask_path",  # .npy int label map, 0 = background, values = angioexp.segments labels
    "gt_mask_path",  # clean full-tree label where mask_path is a pseudo-label
    "primary_angle",  # degrees, LAO +, RAO −
    "secondary_angle",  # degrees, CRA +, CAU −
    "pixel_spacing_mm",
    "source",  # free text: "synthetic", "arcade", a hospital name …
    "view",  # projection name, e.g. "RAO30_CAU25" (informative; angles are authoritative)
    "dominance",  # right / left / co (synthetic data and users who record it)
    "source_image_id",  # the frame's id in its source dataset (ARCADE's image id): exports map back by it
    "source_file_name",  # the frame's file name in its source dataset (ARCADE's scorer matches by it)
)
PATH_COLUMNS = ("cine_path", "mask_path", "segment_mask_path", "gt_mask_path")
SPLITS = ("train", "val", "test")
