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
FORMAT_VERSION = "1.0"  # what a file that uses no 1.1 feature is written as (byte-identical)
FORMAT_VERSION_11 = "1.1"  # what a file that uses any feature of §3.5–3.6 is written as
SUPPORTED_MAJOR = 1
# §4.1 (1.1): canonical JSON list of the features the file uses, sorted; a reader refuses a file
# listing one it does not know (rule 23), so a later minor can add semantics safely.
REQUIRES_KEY = "loratool.requires"
TARGETS_KEY = "loratool.targets"
BASE_KEY = "loratool.base"
SHA256_KEY = "loratool.sha256"
PROVENANCE_KEY = "loratool.provenance"
REQUIRED_KEYS = (FORMAT_KEY, VERSION_KEY, TARGETS_KEY, BASE_KEY, SHA256_KEY)
KNOWN_KEYS = (*REQUIRED_KEYS, PROVENANCE_KEY, REQUIRES_KEY)

# §4.2 per-target fields
SCALE_STANDARD = "standard"  # alpha / r (Hu et al. 2021)
SCALE_RSLORA = "rslora"  # alpha / sqrt(r) (Kalajdzievski 2023)
SCALE_RULES = (SCALE_STANDARD, SCALE_RSLORA)
KIND_LINEAR = "linear"  # torch.nn.Linear: weight [out, in]
KIND_CONV1D = "conv1d"  # transformers' GPT-2 Conv1D: weight stored [in, out]
KIND_EMBEDDING = (
    "embedding"  # torch.nn.Embedding: weight [num_embeddings, dim]; in = num_embeddings
)
# §3.6 (1.1) kinds that are not a pair of LoRA factors
KIND_FULL = "full"  # whole replacement tensors (PEFT modules_to_save), maybe with grown rows
KIND_TOKENS = "tokens"  # replacement rows of an embedding (PEFT trainable_token_indices)
KIND_BIAS = "bias"  # a bias delta on a module that has no LoRA (PEFT bias="all")
KINDS_10 = (KIND_LINEAR, KIND_CONV1D, KIND_EMBEDDING)
# Image-model kinds (1.1): Conv2d LoRA (kohya LoCon, PEFT Conv2d) and LyCORIS' LoHa and LoKr
KIND_CONV2D = "conv2d"  # lora_A [r, in, kh, kw], lora_B [out, r, 1, 1], header field kernel
KIND_LOHA = "loha"  # ΔW = scale·(w1_a·w1_b) ⊙ (w2_a·w2_b)
KIND_LOKR = "lokr"  # ΔW = scale·kron(w1, w2)
KINDS_IMAGE = (KIND_CONV2D, KIND_LOHA, KIND_LOKR)
KINDS = (*KINDS_10, KIND_FULL, KIND_TOKENS, KIND_BIAS, *KINDS_IMAGE)
TARGET_FIELDS = ("alpha", "in_features", "kind", "out_features", "rank", "scale_rule")

# §3.5 (1.1) per-target features of a LoRA target (field ``features``), each with its tensor
FEATURE_DORA = "dora"  # M.magnitude [out]: W' = m ⊙ V/‖V‖_row, V = W + ΔW (Liu et al. 2024)
FEATURE_LORA_BIAS = "lora_bias"  # M.lora_bias [out]: b' = b + scale·lora_bias (PEFT lora_bias)
FEATURE_BIAS = "bias"  # M.bias_delta [out]: b' = b + bias_delta (PEFT bias="lora_only")
FEATURES = (FEATURE_BIAS, FEATURE_DORA, FEATURE_LORA_BIAS)
# Names in ``loratool.requires`` (§4.1): every 1.1 feature and every 1.1 kind a file uses.
REQUIRABLE = (*FEATURES, KIND_FULL, KIND_TOKENS, KIND_BIAS, *KINDS_IMAGE)

# §3.5–3.6 tensor parts: a target M owns the tensors ``M.<part>`` its kind and features name
PART_A = "lora_A"
PART_B = "lora_B"
PART_MAGNITUDE = "magnitude"
PART_LORA_BIAS = "lora_bias"
PART_BIAS_DELTA = "bias_delta"
PART_WEIGHT = "weight"
PART_BIAS = "bias"
PART_TOKEN_VALUES = "token_values"
MAX_TOKENS = 1 << 20  # bounds a hostile ``indices`` list (rule 26)

# §4.3 base binding
FINGERPRINT_PREFIX = "sha256:"
BASE_FIELDS = ("fingerprint", "hub_id", "revision")

# Bounds that keep a hostile header from costing memory or time.
MAX_TARGETS = 100_000
MAX_DIM = 1 << 24
MAX_RANK = 1 << 16
