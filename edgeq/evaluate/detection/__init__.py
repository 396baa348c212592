"""Object detection: boxes and NMS, decoders for common head layouts, mAP and box agreement (pure numpy)."""
