"""Measurement: metrics (mAP, mIoU protocols, the MFI figure: `metrics`), zero-shot segmentation maps
(`segmentation`, `segment_maps`, `seg_eval`), segment-driven zero-shot MLR (`zsmlr`) and what every
evaluation reads (`sources`: the backbone, the projectors and which, dataset roots).

May import `extraction` and below; training's per-epoch validation uses it, not the reverse.
"""
