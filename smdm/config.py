"""Model configurations: the paper's table of sizes plus tiny CPU sizes, in one place.

The paper's sizes are copied from ML-GSAI/SMDM (`lit_gpt/config.py`, `Diff_LLaMA_*`): block size 2048,
vocabulary 32000 (TinyLlama's tokenizer), LLaMA blocks with as many key/value heads as query heads.
A name like "smdm-170m" denotes the architecture; the same config serves an MDM (bidirectional) and an ARM (causal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from smdm.errors import SmdmError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style Transformer. `vocab_size` excludes [MASK]: the embedding has vocab_size + 1 rows."""

    name: str = "custom"
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_query_groups: int | None = None  # key/value heads; None means multi-head attention (= n_head)
    intermediate_size: int | None = None  # SwiGLU hidden size; None means 4 * n_embd
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            object.__setattr__(self, "n_query_groups", self.n_head)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        if self.n_embd % self.n_head:
            raise SmdmError(f"config {self.name}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_query_groups:
            raise SmdmError(f"config {self.name}: n_head {self.n_head} is not divisible by n_query_groups {self.n_query_groups}")
        if min(self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise SmdmError(f"config {self.name}: sizes must be positive")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mask_id(self) -> int:
        """Id of [MASK]: the one embedding row past the tokenizer's vocabulary."""
        return self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SmdmError(f"model config has unknown fields {sorted(unknown)}: not an smdm checkpoint?")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Look up a named config ("smdm-170m", "tiny-2m", ...) and apply overrides such as vocab_size."""
        key = name.lower()
        if key not in CONFIGS:
            raise SmdmError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        return replace(CONFIGS[key], **overrides)


def non_embedding_params(config: ModelConfig) -> int:
    """Parameters outside the token embedding and the output head: the N of the paper's C = 6·N·D."""
    d, hs = config.n_embd, config.head_size
    attention = d * (config.n_head + 2 * config.n_query_groups) * hs + config.n_head * hs * d
    mlp = 3 * d * config.intermediate_size
    norms = 2 * d
    return config.n_layer * (attention + mlp + norms) + d  # + final norm


def total_params(config: ModelConfig) -> int:
    """All parameters: non-embedding plus the (vocab+1)-row embedding and the vocab-row output head."""
    return non_embedding_params(config) + (2 * config.vocab_size + 1) * config.n_embd


# (layers, heads, width, SwiGLU hidden) of the paper's models, keyed by non-embedding size in millions.
_PAPER_SHAPES: dict[int, tuple[int, int, int, int]] = {
    6: (6, 4, 256, 1024),
    19: (8, 6, 384, 1536),
    34: (8, 8, 512, 2048),
    48: (9, 9, 576, 2304),
    66: (10, 10, 640, 2560),
    85: (13, 10, 640, 2560),
    113: (12, 12, 768, 3072),
    142: (15, 12, 768, 3072),
    170: (18, 12, 768, 3072),
    180: (14, 14, 896, 3584),
    206: (16, 14, 896, 3584),
    231: (18, 14, 896, 3584),
    268: (16, 16, 1024, 4096),
    302: (18, 16, 1024, 4096),
    336: (20, 16, 1024, 4096),
    472: (18, 10, 1280, 5120),
    551: (21, 10, 1280, 5120),
    571: (18, 11, 1408, 5632),
    629: (24, 10, 1280, 5120),
    666: (21, 11, 1408, 5632),
    717: (19, 12, 1536, 6144),
    761: (24, 11, 1408, 5632),
    831: (22, 12, 1536, 6144),
    944: (25, 12, 1536, 6144),
    1028: (20, 14, 1792, 7168),
    1233: (24, 14, 1792, 7168),
    1476: (22, 16, 2048, 8192),
    1678: (25, 16, 2048, 8192),
    2121: (28, 17, 2176, 8704),
}

# Sizes that train in minutes on a laptop CPU; vocab_size is normally overridden by the tokenizer's.
_TINY_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    # name: (layers, heads, width, SwiGLU hidden, block size)
    "tiny-test": (2, 4, 64, 256, 128),
    "tiny-1m": (4, 4, 128, 512, 256),
    "tiny-3m": (6, 4, 192, 768, 256),
    "tiny-6m": (6, 6, 288, 1152, 256),
    "tiny-12m": (8, 8, 384, 1536, 256),
}

CONFIGS: dict[str, ModelConfig] = {
    f"smdm-{size}m": ModelConfig(
        name=f"smdm-{size}m", block_size=2048, vocab_size=32000,
        n_layer=layers, n_head=heads, n_embd=width, n_query_groups=heads, intermediate_size=hidden,
    )
    for size, (layers, heads, width, hidden) in _PAPER_SHAPES.items()
}
CONFIGS.update(
    {
        name: ModelConfig(
            name=name, block_size=block, vocab_size=32000,
            n_layer=layers, n_head=heads, n_embd=width, n_query_groups=heads, intermediate_size=hidden,
        )
        for name, (layers, heads, width, hidden, block) in _TINY_SHAPES.items()
    }
)
PAPER_SIZES_M: tuple[int, ...] = tuple(_PAPER_SHAPES)

# A width/depth ladder for CPU-scale IsoFLOP sweeps (`configs/scaling-cpu.json`): about 2x non-embedding parameters
# per rung, depth and width growing together like the paper's table; block size 128 keeps attention cheap.
_SCALE_SHAPES: dict[str, tuple[int, int, int]] = {
    # name (≈ non-embedding params): (layers, heads, width); SwiGLU hidden = 4 x width
    "scale-18k": (2, 2, 24),
    "scale-33k": (2, 2, 32),
    "scale-74k": (2, 3, 48),
    "scale-150k": (3, 4, 56),
    "scale-330k": (4, 4, 72),
    "scale-620k": (5, 4, 88),
    "scale-1.2m": (6, 4, 112),
}
CONFIGS.update(
    {
        name: ModelConfig(
            name=name, block_size=128, vocab_size=32000,
            n_layer=layers, n_head=heads, n_embd=width, n_query_groups=heads, intermediate_size=4 * width,
        )
        for name, (layers, heads, width) in _SCALE_SHAPES.items()
    }
)


def config_table() -> str:
    """The named configs as a text table (`smdm configs`)."""
    header = (f"{'name':<12} {'layers':>6} {'heads':>5} {'width':>5} {'mlp':>6} {'block':>5} {'non-emb':>9} "
              f"{'total':>9}")
    lines = [header]
    for name, c in CONFIGS.items():
        lines.append(f"{name:<12} {c.n_layer:>6} {c.n_head:>5} {c.n_embd:>5} {c.intermediate_size:>6} "
                     f"{c.block_size:>5} {non_embedding_params(c) / 1e6:>8.1f}M {total_params(c) / 1e6:>8.1f}M")
    return "\n".join(lines)
