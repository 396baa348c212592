"""Detection as a task: boxes and NMS, decoders for common detector heads, COCO-style mAP and agreement with FP32."""
from edgeq.evaluate.detection.boxes import Detections, iou_matrix, nms, select
from edgeq.evaluate.detection.decoders import DECODERS, DEFAULT_IOU, detect_layout, load_user_decoder, resolve_decoder
from edgeq.evaluate.detection.metrics import agreement_counts, box_f1, coco_map

__all__ = ["DECODERS", "DEFAULT_IOU", "Detections", "agreement_counts", "box_f1", "coco_map", "detect_layout",
           "iou_matrix", "load_user_decoder", "nms", "select", "resolve_decoder"]
