"""File formats of frozen models: ``packed`` (safetensors with a JSON header, codes bit-packed)
and ``onnx`` (standard operators, bit-exact with the frozen model)."""
