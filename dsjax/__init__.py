"""dsjax: DeepSpeed-Inference rebuilt on JAX/XLA (and Pallas kernels).

    engine = dsjax.init_inference("path/to/hf-checkpoint", dtype="bf16", max_out_tokens=1024)
    out = engine.generate([[15496, 11, 995]], max_new_tokens=32)
"""

from dsjax.config import EncoderConfig, ImageConfig, InferenceConfig, ModelConfig, RopeScaling
from dsjax.encoders import CLIPOutput, EmbeddingOutput
from dsjax.engine import build_engine, convert_checkpoint, init_inference
from dsjax.engines import DecoderEngine, EncoderEngine, GenerationOutput, InferenceEngine
from dsjax.policy import KernelPolicy
from dsjax.quant import QuantSpec

__version__ = "0.1.0"

__all__ = ["CLIPOutput", "DecoderEngine", "EmbeddingOutput", "EncoderConfig", "EncoderEngine",
           "GenerationOutput", "ImageConfig", "InferenceConfig", "InferenceEngine", "KernelPolicy",
           "ModelConfig", "QuantSpec", "RopeScaling", "build_engine", "convert_checkpoint",
           "init_inference"]
