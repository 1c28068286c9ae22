"""Names and limits of the loratool adapter format v1, mirroring spec/adapter-format.md.

Every string a reader or writer matches lives here once, with the spec section that defines it.
"""

from __future__ import annotations

# §2 Container
HEADER_LENGTH_BYTES = 8  # little-endian u64 before the JSON header (safetensors)
MAX_HEADER_BYTES = (
    100_000_000  # the safetensors limit; bounds what a hostile file can make us parse
)
HEADER_ALIGNMENT = 8  # the header is padded with spaces so tensor data starts 8-byte aligned
METADATA_KEY = "__metadata__"

# §3 Tensors
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"

# dtype name in the safetensors header -> bytes per element. Order matters for the writer: wider
# dtypes are written first so every tensor starts at an offset aligned to its element size.
DTYPE_SIZES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
# Short names used in the CLI and reports.
DTYPE_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

# §4 Header metadata (all keys are strings; structured values are canonical JSON)
NAMESPACE = "loratool."
FORMAT_KEY = "loratool.format"
FORMAT_MARKER = "loratool.adapter"
VERSION_KEY = "loratool.version"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1
TARGETS_KEY = "loratool.targets"
BASE_KEY = "loratool.base"
SHA256_KEY = "loratool.sha256"
PROVENANCE_KEY = "loratool.provenance"
REQUIRED_KEYS = (FORMAT_KEY, VERSION_KEY, TARGETS_KEY, BASE_KEY, SHA256_KEY)

# §4.2 per-target fields
SCALE_STANDARD = "standard"  # alpha / r (Hu et al. 2021)
SCALE_RSLORA = "rslora"  # alpha / sqrt(r) (Kalajdzievski 2023)
SCALE_RULES = (SCALE_STANDARD, SCALE_RSLORA)
KIND_LINEAR = "linear"  # torch.nn.Linear: weight [out, in]
KIND_CONV1D = "conv1d"  # transformers' GPT-2 Conv1D: weight stored [in, out]
KIND_EMBEDDING = (
    "embedding"  # torch.nn.Embedding: weight [num_embeddings, dim]; in = num_embeddings
)
KINDS = (KIND_LINEAR, KIND_CONV1D, KIND_EMBEDDING)
TARGET_FIELDS = ("alpha", "in_features", "kind", "out_features", "rank", "scale_rule")

# §4.3 base binding
FINGERPRINT_PREFIX = "sha256:"
BASE_FIELDS = ("fingerprint", "hub_id", "revision")

# Bounds that keep a hostile header from costing memory or time.
MAX_TARGETS = 100_000
MAX_DIM = 1 << 24
MAX_RANK = 1 << 16
