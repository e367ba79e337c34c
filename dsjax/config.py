"""Configuration: what the model is (ModelConfig) and how to run it (InferenceConfig).

ModelConfig describes every family dsjax serves through ONE generic transformer; families differ
only in these fields and in their converter. Both dataclasses are frozen, hashable (they are
static arguments under jit) and round-trip through JSON with a dsjax checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax.numpy as jnp
import numpy as np

from dsjax import numerics
from dsjax.numerics import NORM_KINDS
from dsjax.policy import KernelPolicy
from dsjax.quant.weights import QuantSpec

NORMS = NORM_KINDS
ACTIVATIONS = tuple(numerics.ACTIVATIONS)
POSITIONS = ("learned", "rotary", "alibi", "none")
ROTARY_LAYOUTS = ("half", "interleaved")
ROPE_KINDS = ("default", "linear", "llama3")
POOLERS = ("none", "tanh", "relu", "class", "eos", "argmax")
ENCODER_HEADS = ("none", "mlm", "classifier")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (HF `rope_scaling`): 'linear' divides positions by `factor`;
    'llama3' stretches low frequencies as Llama-3.1 does."""

    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        _check_choice("rope_scaling.kind", self.kind, ROPE_KINDS)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sparse MLP layers (Mixtral, Qwen2-MoE): a router picks top_k of num_experts gated MLPs of
    width expert_size for each token (softmax over all experts, then the top k; norm_topk:
    their weights renormalized to sum to 1); a shared expert of width shared_size (0: none),
    scaled by a sigmoid gate, adds to every token's output. layers: the sparse layers (None:
    all; the others keep the dense MLP of intermediate_size)."""

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk: bool = True
    shared_size: int = 0
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe: top_k={self.top_k} must lie in [1, num_experts="
                             f"{self.num_experts}]")
        if self.expert_size < 1 or self.shared_size < 0:
            raise ValueError(f"moe: expert_size={self.expert_size} must be >= 1 and "
                             f"shared_size={self.shared_size} >= 0")

    def sparse(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder or encoder transformer, in family-neutral terms."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    # normalization
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # Gemma: scale applied as (1 + w)
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool = True
    embedding_norm: bool = False  # BLOOM: LayerNorm right after the embedding
    # MLP
    activation: Literal["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"] = "gelu"
    gated_mlp: bool = False  # act(x @ gate) * (x @ up), gate and up fused in one kernel
    # positions
    positions: Literal["learned", "rotary", "alibi", "none"] = "learned"
    position_offset: int = 0  # OPT: learned table indexed at position + 2
    rotary_dim: int | None = None  # None: the whole head (partial rotary otherwise)
    rotary_layout: Literal["half", "interleaved"] = "half"  # NeoX/LLaMA vs GPT-J pairs
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # attention
    causal: bool = True  # False for encoders (BERT, CLIP vision)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); GPT-Neo: 1.0
    qk_norm: Literal["none", "head", "full"] = "none"  # q, k normed per head (Qwen3) or over
    # the whole projection (OLMoE), before the rotary embedding
    sliding_window: int | None = None  # keys with q_pos - k_pos >= window are masked
    local_layers: tuple[int, ...] | None = None  # layers that use the window; None: all
    # residual
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x))  (GPT-J, NeoX)
    shared_norm: bool = False  # parallel residual off ONE norm (GPT-J)
    # biases
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    # embeddings and head
    embed_proj_dim: int | None = None  # OPT-350m: embeddings of this width, projected in/out
    lm_head_bias: bool = False  # GPT-J
    tie_word_embeddings: bool = True
    embed_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    type_vocab_size: int = 0  # BERT token types
    encoder: EncoderConfig | None = None  # set: an encoder (dsjax.encoders.Encoder) around this body
    moe: MoEConfig | None = None  # set: sparse expert MLPs in the layers it names

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.local_layers, list):
            object.__setattr__(self, "local_layers", tuple(self.local_layers))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, ("pre", "post"))
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("rotary_layout", self.rotary_layout, ROTARY_LAYOUTS)
        _check_choice("qk_norm", self.qk_norm, ("none", "head", "full"))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1 and not (name == "vocab_size" and self.takes_images):
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.takes_images and self.vocab_size:
            raise ValueError("an image tower (encoder.image set) has no token vocabulary: vocab_size=0")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads});"
                " set head_dim explicitly"
            )
        if self.positions == "rotary" and (self.rot_dim % 2 or self.rot_dim > self.dim_head):
            raise ValueError(f"rotary_dim ({self.rot_dim}) must be even and <= head_dim ({self.dim_head})")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm=True needs parallel_residual=True")
        if self.norm_position == "post" and self.parallel_residual:
            raise ValueError("post-norm blocks with a parallel residual are not a known family")
        if self.local_layers is not None and self.sliding_window is None:
            raise ValueError("local_layers is set but sliding_window is None")

    @property
    def takes_images(self) -> bool:
        """The body embeds image patches instead of tokens (a CLIP vision tower)."""
        return self.encoder is not None and self.encoder.image is not None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.dim_head

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.dim_head**-0.5

    def check_length(self, tokens: int) -> None:
        """A learned position table ends: a longer input is an error, never a clipped lookup."""
        if self.positions == "learned" and tokens > self.max_position_embeddings:
            raise ValueError(f"{tokens} tokens exceed the {self.max_position_embeddings} learned "
                             f"positions of this {self.family} model")

    def check_ids(self, ids, what: str = "token ids") -> None:
        """Ids outside the vocabulary would read NaN rows of the embedding: refuse them."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{what} must lie in [0, {self.vocab_size}); got "
                             f"[{ids.min()}, {ids.max()}]")

    def layer_window(self, layer: int) -> int | None:
        if self.local_layers is None or layer in self.local_layers:
            return self.sliding_window
        return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Square images cut into square patches (CLIP): a stride-`patch_size` conv, i.e. a linear
    map of each flattened [channels, patch, patch] patch. Pixels past the last whole patch are
    dropped, as the conv drops them."""

    image_size: int
    patch_size: int
    num_channels: int = 3

    def __post_init__(self):
        if not 1 <= self.patch_size <= self.image_size or self.num_channels < 1:
            raise ValueError(f"bad image geometry {self}: need 1 <= patch_size <= image_size")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What an encoder adds around its generic body (ModelConfig.encoder).

    pooler makes `pooler_output` [B, D]: 'tanh' / 'relu': act(dense(h[:, 0])) (BERT's pooler,
    DistilBERT's pre-classifier); 'class': norm(h[:, 0]) (CLIP vision's post_layernorm); 'eos':
    h at the first `eos_token_id`; 'argmax': h at the largest input id (CLIP's legacy rule).
    head: 'mlm' (dense, act, norm, then the tied or own vocabulary matrix + bias) or
    'classifier' (a linear map of pooler_output to num_labels). projection_dim > 0: a bias-free
    projection of pooler_output (CLIP). vision: a second, image tower beside this text tower;
    the pair has a logit scale (CLIPModel).
    """

    pooler: Literal["none", "tanh", "relu", "class", "eos", "argmax"] = "none"
    head: Literal["none", "mlm", "classifier"] = "none"
    num_labels: int = 0
    eos_token_id: int | None = None
    image: ImageConfig | None = None
    projection_dim: int = 0
    vision: ModelConfig | None = None

    def __post_init__(self):
        if isinstance(self.image, dict):
            object.__setattr__(self, "image", ImageConfig(**self.image))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ModelConfig(**self.vision))
        _check_choice("encoder.pooler", self.pooler, POOLERS)
        _check_choice("encoder.head", self.head, ENCODER_HEADS)
        if self.head == "classifier" and (self.num_labels < 1 or self.pooler in ("none", "class")):
            raise ValueError("a classifier head needs num_labels >= 1 and a dense pooler (tanh/relu)")
        if self.pooler == "eos" and self.eos_token_id is None:
            raise ValueError("pooler='eos' needs eos_token_id")
        if (self.pooler == "class") != (self.image is not None):
            raise ValueError("pooler='class' is the image towers' pooler, and theirs only")
        if self.vision is not None:
            if not self.vision.takes_images or self.image is not None:
                raise ValueError("encoder.vision must be an image tower beside a text tower")
            if not self.projection_dim or self.vision.encoder.projection_dim != self.projection_dim:
                raise ValueError("a text/image pair needs equal projection_dim > 0 on both towers")


DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "float": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
}
QUANTIZED_DTYPES = {"int8": 8, "qint8": 8, "int4": 4}  # DeepSpeed's dtype=int8: weight-only


def resolve_dtype(dtype) -> jnp.dtype:
    """Accepts 'bf16'/'fp16'/'fp32' spellings, numpy/JAX dtypes and torch dtypes."""
    name = dtype_name(dtype)
    if name in QUANTIZED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is a weight format, not a compute dtype: pass it to "
                         "init_inference(dtype=...) or quant=..., which compute in bf16")
    try:
        return jnp.dtype(DTYPES[name])
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; choose one of bf16, fp16, fp32 (or their long names), "
            "or int8 / int4 for weight-only quantization"
        ) from None


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.").lower() if dtype is not None else "bfloat16"


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How a model is served: compute dtype, token budget, the kernel policy, weight and cache
    formats (parallelism: dsjax.parallel.mesh.Parallel)."""

    dtype: str = "bfloat16"
    max_out_tokens: int = 1024  # prompt + new tokens per sequence; the KV cache capacity
    kernels: KernelPolicy = KernelPolicy()  # which implementation each op runs (dsjax.policy)
    quant: QuantSpec | None = None  # weight-only quantization of the GEMM weights
    kv_cache_dtype: Literal["auto", "int8"] = "auto"  # auto: the compute dtype

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(resolve_dtype(self.dtype)).name)
        if self.max_out_tokens < 2:
            raise ValueError(f"max_out_tokens must be >= 2, got {self.max_out_tokens}")
        if not isinstance(self.kernels, KernelPolicy):
            raise TypeError(f"InferenceConfig.kernels must be a KernelPolicy, got {self.kernels!r}")
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", "int8"))

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
