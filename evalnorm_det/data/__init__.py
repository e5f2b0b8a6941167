"""Datasets bundled with evalnorm_det; importing this registers them in detectron2.

``evalnorm_digits_train`` (1000 images) and ``evalnorm_digits_val`` (200 images) are generated
under ``$DETECTRON2_DATASETS`` when first loaded; see ``evalnorm_det.data.digits``.
"""

from .digits import generate_digits, register_digits, render_split, write_coco2014_layout

register_digits()

__all__ = ["generate_digits", "register_digits", "render_split", "write_coco2014_layout"]
