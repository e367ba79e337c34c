"""Quantized weights (weights.py) and MoQ, DeepSpeed's Mixture-of-Quantization training
(moq.py: the schedule and the fake-quantizer; train.py: optax fine-tuning and export, which
needs the `train` extra and is imported as dsjax.quant.train)."""

from dsjax.quant.moq import (BitSchedule, EigenvalueSchedule, MoQConfig, export_weight,
                             fake_quantize)
from dsjax.quant.weights import (QuantizedWeight, QuantSpec, abstract_layout, abstract_quantized,
                                 dequantize, quantizable, quantize, quantize_flat)

__all__ = ["BitSchedule", "EigenvalueSchedule", "MoQConfig", "QuantSpec", "QuantizedWeight",
           "abstract_layout", "abstract_quantized", "dequantize", "export_weight", "fake_quantize",
           "quantizable", "quantize", "quantize_flat"]
