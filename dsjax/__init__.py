"""dsjax: DeepSpeed-Inference rebuilt on JAX/XLA (and Pallas kernels).

    engine = dsjax.init_inference("path/to/hf-checkpoint", dtype="bf16", max_out_tokens=1024)
    out = engine.generate([[15496, 11, 995]], max_new_tokens=32)
"""

from dsjax.config import EncoderConfig, ImageConfig, InferenceConfig, ModelConfig, RopeScaling
from dsjax.encoders import CLIPOutput, EmbeddingOutput
from dsjax.engine import GenerationOutput, InferenceEngine, convert_checkpoint, init_inference
from dsjax.quant import QuantSpec

__version__ = "0.1.0"

__all__ = ["CLIPOutput", "EmbeddingOutput", "EncoderConfig", "GenerationOutput", "ImageConfig",
           "InferenceConfig", "InferenceEngine", "ModelConfig", "QuantSpec", "RopeScaling",
           "convert_checkpoint", "init_inference"]
