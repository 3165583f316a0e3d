"""Pure-numpy factorizations; this package never imports onnx."""
