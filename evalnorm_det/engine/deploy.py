"""What ``evalnorm.deploy`` compares on a detectron2 detector: outputs whose shape does not
depend on the normalization, on proposals held fixed."""

import torch
from detectron2.modeling.roi_heads import Res5ROIHeads

__all__ = ["detector_outputs", "with_proposals"]


@torch.no_grad()
def with_proposals(model, batches):
    """``[(inputs, proposals)]``: each batch of detectron2 inputs with the proposals ``model``
    makes for it as it evaluates now (the reference the deployed model is compared on)."""
    model.eval()
    out = []
    for inputs in batches:
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        out.append((inputs, proposals))
    return out


def detector_outputs(model, batch):
    """A ``GeneralizedRCNN``'s raw outputs for ``batch = (inputs, proposals)`` (see
    ``with_proposals``): the backbone's feature maps, the RPN's objectness logits and anchor
    deltas, the box predictor's class scores and box deltas on the given proposals and, with a
    mask head, its mask logits on them. Held fixed, the proposals make the same ROIs comparable
    however the backbone evaluates."""
    inputs, proposals = batch
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    rpn, heads = model.proposal_generator, model.roi_heads
    rpn_outputs = rpn.rpn_head([features[f] for f in rpn.in_features])
    boxes = [p.proposal_boxes for p in proposals]
    masks = []
    if isinstance(heads, Res5ROIHeads):
        roi_features = heads._shared_roi_transform([features[f] for f in heads.in_features], boxes)
        predictions = heads.box_predictor(roi_features.mean(dim=[2, 3]))
        if heads.mask_on:
            masks.append(heads.mask_head.layers(roi_features))
    else:  # StandardROIHeads
        roi_features = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        predictions = heads.box_predictor(heads.box_head(roi_features))
        if heads.mask_on:
            mask_features = [features[f] for f in heads.mask_in_features]
            if heads.mask_pooler is not None:
                mask_features = heads.mask_pooler(mask_features, boxes)
            else:
                mask_features = dict(zip(heads.mask_in_features, mask_features))
            masks.append(heads.mask_head.layers(mask_features))
    return [features[k] for k in sorted(features)], rpn_outputs, predictions, *masks
