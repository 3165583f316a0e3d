"""onnx-lowrank: rewrite convolutions into low-rank op chains."""
