"""Frozen (inference) models: ``freeze`` turns converted layers into packed-code integer layers
(``layers``), the float layers between them into runtime-independent forms (``float_layers``);
``fuse`` joins a conv with its BatchNorm, residual add and ReLU. Freezing is one-way: export
and reports work on frozen models."""
