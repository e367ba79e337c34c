"""Quantized weights (weights.py); MoQ training arrives with its own issue."""

from dsjax.quant.weights import (QuantizedWeight, QuantSpec, abstract_quantized, dequantize,
                                 quantizable, quantize, quantize_flat)

__all__ = ["QuantSpec", "QuantizedWeight", "abstract_quantized", "dequantize", "quantizable",
           "quantize", "quantize_flat"]
