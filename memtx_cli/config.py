"""Run configuration: one flat dataclass whose keys are the CLI flags.

Precedence: dataclass defaults < the model card's `settings` < `--config FILE.yaml` < flags.
YAML keys are the flag names (`segment: 512`, `xl-cache: false`; `_` and `-` both accepted).
The merged config is what banks record, so a bank says exactly how it was built.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from memtx_cli.errors import UsageError

CONTEXT_MODES = ("window", "full")
COMBINE_MODES = ("joint", "gate")
POSITION_SCHEMES = ("fixed", "true", "clamped")
RETRIEVAL_MODES = ("token", "block")
BLOCK_SELECT = ("auto", "exact", "means")


@dataclass
class Config:
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0  # 0 = torch's default (one per physical core)
    # Segment length: 512 tokens, as in the paper; a segment attends to itself plus the XL
    # cache (previous segment), so local attention spans 512..1024 tokens.
    segment: int = 512
    xl_cache: bool = True
    # "window": stream segments with the XL cache; "full": causal attention over chunks of the
    # model's trained context (the reference computation).
    context: str = "window"
    max_tokens: int = 0  # 0 = the whole document
    # --- memory (Memorizing Transformers); defaults chosen by benchmarks/, see README ---
    memory: bool = True  # kNN memory of everything that left the XL cache
    # Upper half of the layers: on SmolLM2 at 8K tokens, layers 15-29 gave 29.34 on a book
    # where all 30 gave 29.35 and layers 0-14 30.49 (worse than no memory with sinks, 30.28).
    memory_layers: str = "auto"  # "auto" (upper half), "all", "8,16,24", "10-19", "4,20-29"
    # KV heads with memory within the memory layers: "all", "topN" (the N first of
    # head_ranking), "topqN" (the N first query heads of query_head_ranking: their KV heads
    # keep memories, only those query heads read them) or "layer.head" pairs ("18.2,8.0").
    # Block retrieval: a pair may carry the number of blocks that head reads ("18.2:224"; the
    # others read `blocks`; token retrieval reads top-k in the same heads, budgets aside).
    # Heads differ: with 16 blocks most lose 97-99% of what they need memory for, where 18.2
    # keeps a quarter of it with 96 (benchmarks/head_budgets.py).
    memory_heads: str = "all"
    # KV heads ranked by how much full attention's output needs keys beyond the window (the
    # model card's, from benchmarks/head_ranking.py on held-out documents), best first.
    head_ranking: str = ""
    query_head_ranking: str = ""  # the same per query head (layer.query_head), for topqN
    top_k: int = 32  # memories retrieved per query (paper: 32)
    # IVF: exact search until 8192 keys per head have arrived, then IVF (nprobe 48); flat
    # search cost grows with the document and dominated memory time past 8K tokens.
    index: str = "ivf"  # flat | ivf | hnsw | a FAISS factory string
    nprobe: int = 48  # IVF lists searched (of 128): recall@32 0.953 on real keys; 32 gave 0.911
    combine: str = "joint"  # joint softmax (training-free) | gate (paper's sigmoid gate)
    gate_init: float = 0.0  # initial gate bias b_h: g = sigmoid(b_h) = 0.5
    # fixed beat clamped/true on code and book at 8K with 10 memory layers (4.42 vs 4.57;
    # 29.73 vs 29.95) and, unlike true positions, holds past the trained context.
    positions: str = "fixed"  # memory position scheme: fixed | true | clamped
    # clamped: layers whose memory heads also read memories older than the trained context (at
    # the fixed distance); the others read only memories within it.
    far_layers: str = "all"
    far_blocks: int = -1  # clamped: -1 = far blocks share `blocks`; n = a budget of their own
    far_bias: float = 0.0  # clamped with far_blocks > 0: subtracted from far memories' scores
    # clamped block retrieval: n > 0 = memories older than the trained context are read token by
    # token, each query's own top n (searched exactly; far_bias applies), instead of as far blocks
    # (far_blocks is then ignored). A copy from far back needs the key the token's own context
    # asks for; a chunk's block selector is up to block_chunk tokens stale. Lua at 32K, quality
    # setting: 4.001 vs 4.092 with 16 far blocks (README "Far memory token by token").
    far_top_k: int = 0
    # far_top_k: the KV heads that read the far past, "layer.head" pairs (those that are memory
    # heads of far layers do; others are skipped) or "all" = every memory head of the far
    # layers. The far search is most of far memory's cost (every far key scored per head and
    # chunk): in 4 heads it costs 5-7 points of throughput at 64K, in 33 ~30 (README "Far
    # memory in four heads").
    far_heads: str = "all"
    mem_distance: int = 0  # fixed: distance memories sit at; clamped: cap / block: far distance (0 = auto)
    # One search per token for a GQA group (sum of its queries): half the time, nearly the
    # same perplexity (layers 15-29: 4.14 vs 4.10 on code, 29.46 vs 29.34 on a book).
    shared_search: bool = True
    # token: each query's own top-k (the paper); block: each chunk of `block-chunk` tokens
    # picks, per KV head, the `blocks` blocks of `block-size` consecutive memories whose mean
    # key the previous chunk's queries score highest (causal), and attends to them in full
    # (InfLLM-style). Block is the default for its cost: ~36% of throughput at 64K tokens where
    # token retrieval costs ~88% (README, "Memory: quality and cost").
    retrieval: str = "block"
    block_size: int = 32
    blocks: int = 64  # 2,048 memories per token
    block_spread: int = 0  # a block inherits the relevance of this many blocks before it
    block_chunk: int = 64  # 32: legal 8.55 vs 9.10 at 8K, +15% time; 16: 8.29, +30%
    # How a chunk selects blocks. 0: the previous chunk's summed queries . each block's mean
    # key (one dot product per block). n > 0: the queries of the previous chunk's last n tokens
    # vote, each query head apart: each attends over the block means, and a block scores the
    # largest share any of them gives it. On the Debian constitution's versions (a passage
    # copied from 6,300 tokens back) at 8K, quality setting: 9.52 with 8 voters vs 11.59 summed
    # (full attention 9.36), same time. Summing flattens the one passage being copied into the
    # average of all queries; book / code / SPDX unchanged. The defaults keep 0 (README,
    # "Block selection by vote").
    block_votes: int = 0
    # How voters score the blocks within the trained context (clamped, far blocks in a budget of
    # their own or none, votes > 0). "means": each voter's softmax over the block means (one
    # dot product per block). "exact": each block scored by its best key's exact logit (at the
    # real distance), a softmax over the blocks per voter, the voters' shares summed. A mean
    # key ranks a block with one matching key below a block of middling ones: at 8K the
    # session-14 defaults' blocks held 79-83% of their queries' attention mass (book / code),
    # exact ones ~90%. "auto" = exact wherever it applies, means elsewhere (README "Exact
    # block selection").
    block_select: str = "auto"
    # A bank (--memory BANK) adds its own best blocks to the document's own: one shared budget
    # let the bank crowd out the document's past. Measured on a held-out Lua file (lstrlib.c,
    # bank = the other 58 files, own memory alone 5.171): 64 blocks 5.557, 64 with bias 2
    # 5.177, 16 blocks 5.290, 16 with bias 2 5.162 (README, "Memory banks: usefulness").
    bank_blocks: int = 16
    bank_bias: float = 2.0  # subtracted from bank memories' scores (a prior: e^-2 = 0.14)
    # Attention sinks: window-only perplexity 46.9 -> 30.3 on a book, 6.90 -> 4.73 on code.
    sinks: int = 4  # first tokens of a document kept visible in every window (StreamingLLM)
    # Where the sinks sit: "window" = just before the XL cache (StreamingLLM: window positions
    # 0..sinks-1); "real" = at their real distance, capped at the trained context, so that
    # window + memory at real positions is full attention (with "window", every block of memory
    # in every head gave ppl 3.49 on a passage copied from 6,300 tokens back, full attention
    # 2.06); "auto" = real with `true`/`clamped` positions, window with `fixed` (its memories sit
    # just outside the window; at 8K real sinks made the defaults worse on the book, 29.42 vs 29.26).
    sink_positions: str = "auto"

    def __post_init__(self) -> None:
        if self.segment < 1:
            raise UsageError(f"segment must be >= 1 token, got {self.segment}")
        if self.context not in CONTEXT_MODES:
            raise UsageError(f"context must be one of {', '.join(CONTEXT_MODES)}, got {self.context!r}")
        if self.max_tokens < 0:
            raise UsageError(f"max-tokens must be >= 0, got {self.max_tokens}")
        if self.threads < 0:
            raise UsageError(f"threads must be >= 0, got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16", "fp32", "bf16"):
            raise UsageError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.top_k < 1:
            raise UsageError(f"top-k must be >= 1, got {self.top_k}")
        if self.combine not in COMBINE_MODES:
            raise UsageError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}")
        if self.positions not in POSITION_SCHEMES:
            raise UsageError(f"positions must be one of {', '.join(POSITION_SCHEMES)}, got {self.positions!r}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise UsageError(f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}, got {self.retrieval!r}")
        if self.block_size < 1 or 1024 % self.block_size or self.blocks < 1 or self.block_chunk < 1:
            raise UsageError("block-size must be a power of two up to 1024, blocks and block-chunk >= 1")
        if self.far_blocks < -1 or self.far_bias < 0:
            raise UsageError("far-blocks must be >= -1 (-1 = shared budget) and far-bias >= 0")
        if self.far_top_k < 0:
            raise UsageError(f"far-top-k must be >= 0, got {self.far_top_k}")
        if self.far_top_k and (self.positions != "clamped" or self.retrieval != "block"):
            raise UsageError(
                "far-top-k reads memories older than the trained context token by token: "
                "it needs --positions clamped and --retrieval block"
            )
        if self.block_spread < 0:
            raise UsageError(f"block-spread must be >= 0, got {self.block_spread}")
        if not 0 <= self.block_votes <= self.block_chunk:
            raise UsageError(
                f"block-votes must be between 0 (summed selector) and block-chunk ({self.block_chunk}), "
                f"got {self.block_votes}"
            )
        if self.block_select not in BLOCK_SELECT:
            raise UsageError(f"block-select must be one of {', '.join(BLOCK_SELECT)}, got {self.block_select!r}")
        if self.block_select == "exact" and not exact_block_select({**self.memory_settings(), "block_select": "auto"}):
            raise UsageError(
                "block-select exact scores the blocks within the trained context by their voters' "
                "exact attention: it needs --retrieval block --positions clamped, --block-votes > 0 "
                "and --far-blocks >= 0 or --far-top-k > 0 (use --block-select means or auto otherwise)"
            )
        if self.bank_blocks < 1 or self.bank_bias < 0:
            raise UsageError("bank-blocks must be >= 1 and bank-bias >= 0")
        if self.sink_positions not in ("auto", "window", "real"):
            raise UsageError(f"sink-positions must be auto, window or real, got {self.sink_positions!r}")
        if self.sinks < 0 or self.mem_distance < 0 or self.nprobe < 1:
            raise UsageError("sinks and mem-distance must be >= 0, nprobe >= 1")
        window = self.segment * (2 if self.xl_cache else 1)
        if self.sinks > window:
            need = -(-self.sinks // (2 if self.xl_cache else 1))
            raise UsageError(
                f"segment {self.segment} spans fewer tokens than the {self.sinks} attention sinks: "
                f"use --segment {need} or more (or fewer --sinks)"
            )

    def validate_for(self, context_length: int) -> None:
        """Checks that need the model: a window longer than the trained context is refused."""
        window = self.segment * (2 if self.xl_cache else 1)
        if self.context == "window" and window > context_length:
            raise UsageError(
                f"segment {self.segment} with the XL cache spans {window} tokens, more than the "
                f"model's trained context ({context_length}); use --segment {context_length // 2} or less"
            )

    def layers_for(self, n_layers: int) -> list[int]:
        """Parse memory_layers against the model's depth; [] when memory is off."""
        if not self.memory:
            return []
        return parse_layers(self.memory_layers, n_layers)

    def heads_for(self, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
        """Memory layer -> its KV heads with memory (None = all of them); {} when memory is off.
        n_heads (query heads) is needed by `topqN` only."""
        chosen = self._head_choice(n_layers, n_kv, n_heads)
        return {i: (None if len(h) == n_kv else sorted(h)) for i, h in chosen.items()}

    def query_heads_for(self, n_layers: int, n_kv: int, n_heads: int) -> dict[int, list[list[int]] | None]:
        """Memory layer -> for each of its KV heads with memory (heads_for's order), the query
        heads of its group (0..G-1) that read memory; None = every query head of them all."""
        g = n_heads // n_kv
        out: dict[int, list[list[int]] | None] = {}
        for i, heads in self._head_choice(n_layers, n_kv, n_heads).items():
            qs = [sorted(range(g) if heads[h] is None else heads[h]) for h in sorted(heads)]
            out[i] = None if all(len(q) == g for q in qs) else qs
        return out

    def blocks_for(self, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
        """Memory layer -> the blocks each of its memory KV heads reads (heads_for's order), None
        when every head reads `blocks` (only "layer.head:n" pairs give a head its own budget)."""
        spec = str(self.memory_heads).strip().lower()
        if ":" not in spec:
            return dict.fromkeys(self.heads_for(n_layers, n_kv, n_heads))
        own = parse_head_blocks(spec, n_layers, n_kv)
        out: dict[int, list[int] | None] = {}
        for i, heads in self.heads_for(n_layers, n_kv, n_heads).items():
            got = [own[i][h] or self.blocks for h in (heads if heads is not None else range(n_kv))]
            out[i] = None if all(n == self.blocks for n in got) else got
        return out

    def _head_choice(self, n_layers: int, n_kv: int, n_heads: int) -> dict[int, dict[int, set[int] | None]]:
        """Memory layer -> {KV head: its query heads within the group with memory, None = all}."""
        layers = self.layers_for(n_layers)
        spec = str(self.memory_heads).strip().lower()
        if spec == "all":
            return {i: dict.fromkeys(range(n_kv)) for i in layers}
        query = spec.startswith("topq")
        if spec.startswith("top"):
            n = spec[4:] if query else spec[3:]
            ranking = self.query_head_ranking if query else self.head_ranking
            key = "query-head-ranking" if query else "head-ranking"
            ranked = [p for p in str(ranking).split(",") if p.strip()]
            if not n.isdigit() or int(n) < 1:
                raise UsageError(
                    f"memory heads {self.memory_heads!r}: use topN (KV heads) or topqN (query heads) "
                    "with N >= 1, e.g. top60 or topq144"
                )
            if not ranked:
                raise UsageError(
                    f"memory heads {self.memory_heads!r} needs a {key} (the model card has none): "
                    f"run benchmarks/head_ranking.py{' --query-heads' if query else ''} and set {key}, "
                    "or list layer.head pairs"
                )
            spec = ",".join(ranked[: int(n)])
        chosen: dict[int, dict[int, set[int] | None]] = {}
        if query:
            if n_heads < n_kv:
                raise UsageError(f"memory heads {self.memory_heads!r}: the model's query heads are unknown")
            g = n_heads // n_kv
            for layer, qheads in parse_heads(spec, n_layers, n_heads, "query head").items():
                for j in qheads:
                    got = chosen.setdefault(layer, {}).setdefault(j // g, set())
                    got.add(j % g)
        else:
            for layer, kvs in parse_heads(spec, n_layers, n_kv).items():
                chosen[layer] = dict.fromkeys(kvs)
        out = {i: chosen[i] for i in layers if i in chosen}
        if layers and not out:
            raise UsageError(f"memory heads {self.memory_heads!r} select no head in memory layers {self.memory_layers}")
        return out

    def far_rows_for(self, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
        """Memory layer -> the rows of its memory heads (heads_for's order) that read the far past:
        None = all of them, [] = none. far_heads lists candidates; those that are memory heads of
        far layers read it (the card's list stays valid when --memory-heads changes)."""
        heads = self.heads_for(n_layers, n_kv, n_heads)
        far = set(parse_layers(self.far_layers, n_layers)) if heads else set()
        if str(self.far_heads).strip().lower() == "all":
            return {i: (None if i in far else []) for i in heads}
        try:
            wanted = parse_heads(self.far_heads, n_layers, n_kv)
        except UsageError:
            raise UsageError(
                f"far heads {self.far_heads!r}: use all or layer.head pairs, e.g. 18.2,23.0 "
                f"(the model has {n_layers} layers x {n_kv} KV heads)"
            ) from None
        out: dict[int, list[int] | None] = {}
        for i, hs in heads.items():
            order = list(range(n_kv)) if hs is None else hs
            out[i] = [r for r, h in enumerate(order) if i in far and h in wanted.get(i, set())]
        return out

    def memory_settings(self) -> dict[str, Any]:
        keys = (
            "memory",
            "memory_layers",
            "memory_heads",
            "head_ranking",
            "query_head_ranking",
            "top_k",
            "index",
            "nprobe",
            "combine",
            "gate_init",
            "positions",
            "mem_distance",
            "far_layers",
            "far_blocks",
            "far_bias",
            "far_top_k",
            "far_heads",
            "shared_search",
            "retrieval",
            "block_size",
            "blocks",
            "block_chunk",
            "block_spread",
            "block_votes",
            "block_select",
            "bank_blocks",
            "bank_bias",
            "sinks",
            "sink_positions",
            "segment",
            "xl_cache",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exact_block_select(settings: dict[str, Any]) -> bool:
    """Whether block selection scores near blocks exactly (Config.block_select), from a config's
    memory settings (a bank's too: settings written before the key existed mean means)."""
    mode = settings.get("block_select", "means")
    applies = (
        settings.get("retrieval") == "block"
        and settings.get("positions") == "clamped"
        and bool(settings.get("block_votes"))
        # near blocks in a budget of their own: far blocks apart, none, or read token by token
        and (int(settings.get("far_blocks", -1)) >= 0 or int(settings.get("far_top_k", 0)) > 0)
    )
    return mode == "exact" or (mode == "auto" and applies)


def blocks_read(memory_heads: str, blocks: int) -> str:
    """How many blocks a head reads, for display: "96", or the range of the per-head budgets
    a memory-heads spec lists ("18.2:224,8.0:16" -> "16-224 (240 in all)")."""
    own = [int(n) for n in re.findall(r":(\d+)", str(memory_heads))]
    return f"{min(own)}-{max(own)} ({sum(own):,} in all)" if own else str(blocks)


def _norm_key(k: str) -> str:
    return k.replace("-", "_")


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of setting: value")
    return {_norm_key(str(k)): v for k, v in data.items()}


def merge_config(*layers: dict[str, Any] | None) -> Config:
    """Merge dicts left to right (later wins; None values are skipped) into a checked Config.
    `blocks` set in a later layer than per-head budgets (memory-heads "18.2:224,...", the
    card's) overrides them: the same heads, each reading `blocks`."""
    known = {f.name: f for f in fields(Config)}
    merged: dict[str, Any] = {}
    where: dict[str, int] = {}  # key -> the layer that set it
    for n, layer in enumerate(layers):
        for k, v in (layer or {}).items():
            k = _norm_key(k)
            if v is None:
                continue
            if k not in known:
                raise UsageError(f"unknown setting {k!r} (known: {', '.join(sorted(known))})")
            merged[k], where[k] = _coerce(k, v, known[k].type), n
    heads = str(merged.get("memory_heads", ""))
    if ":" in heads and where.get("blocks", -1) > where["memory_heads"]:
        merged["memory_heads"] = ",".join(p.split(":")[0].strip() for p in heads.split(",") if p.strip())
    # Far memory token by token needs clamped block retrieval: positions or retrieval set later
    # than far-top-k (the card's) turn it off rather than fail (`--retrieval token` just works).
    later = max(where.get("positions", -1), where.get("retrieval", -1))
    clamped_blocks = merged.get("positions", "fixed") == "clamped" and merged.get("retrieval", "block") == "block"
    if merged.get("far_top_k") and not clamped_blocks and later > where["far_top_k"]:
        merged["far_top_k"] = 0
    return Config(**merged)


def setting(layer: dict[str, Any], key: str) -> Any:
    """One setting of a layer (a YAML file's), checked as merge_config checks it; None if unset."""
    v = layer.get(key)
    return None if v is None else _coerce(key, v, next(f.type for f in fields(Config) if f.name == key))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """A setting's value as its declared type; YAML's other types (a number for a name, 1.7
    threads, .inf tokens, a list) are refused, not converted."""
    import math

    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if isinstance(value, (list, dict)):
            raise ValueError(value)
        if t == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "on", "1"):
                    return True
                if value.lower() in ("false", "no", "off", "0"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if t == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            out = int(value)
            if abs(out) > 1 << 40:
                raise ValueError(value)
            return out
        if t == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if t == "str":  # a layer list may be one number (memory-layers: 20)
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"setting {key!r}: {value!r} is not a valid {t}") from None
    return value


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """ "all" | "8,16,24" | "10-19" | "4,20-29" -> sorted layer indices, each checked."""
    spec = str(spec).strip().lower()
    if spec in ("all", "*"):
        return list(range(n_layers))
    if spec == "auto":
        return list(range(n_layers // 2, n_layers))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if m is None:
            raise UsageError(f"memory layers {spec!r}: use all, a list like 8,16,24 or a range like 10-19")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for i in range(lo, hi + 1):
            if not 0 <= i < n_layers:
                raise UsageError(
                    f"memory layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})"
                )
            out.add(i)
    if not out:
        raise UsageError(f"memory layers {spec!r} selects no layer")
    return sorted(out)


def parse_heads(spec: str, n_layers: int, n_kv: int, what: str = "KV head") -> dict[int, set[int]]:
    """ "18.2,8.0,23.0" (layer.head pairs; n_kv heads per layer) -> {layer: {heads}}, each checked.
    A pair may carry its own block budget, "18.2:224" (`parse_head_blocks` reads it)."""
    return {layer: set(heads) for layer, heads in parse_head_blocks(spec, n_layers, n_kv, what).items()}


def parse_head_blocks(spec: str, n_layers: int, n_kv: int, what: str = "KV head") -> dict[int, dict[int, int]]:
    """ "18.2:224,8.0" -> {layer: {head: blocks}}, 0 where the pair gives no budget of its own."""
    out: dict[int, dict[int, int]] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        m = re.fullmatch(r"(\d+)\.(\d+)(?::(\d+))?", part)
        if m is None or m.group(3) is not None and (int(m.group(3)) < 1 or what != "KV head"):
            raise UsageError(
                f"memory heads {spec!r}: use all, topN, topqN or layer.head pairs like 18.2,8.0 "
                "(KV heads may carry their own block budget >= 1: 18.2:224,8.0:32)"
            )
        layer, head = int(m.group(1)), int(m.group(2))
        if not 0 <= layer < n_layers or not 0 <= head < n_kv:
            raise UsageError(
                f"memory head {part} is out of range: the model has {n_layers} layers and {n_kv} {what}s per layer"
            )
        out.setdefault(layer, {})[head] = int(m.group(3) or 0)
    if not out:
        raise UsageError(f"memory heads {spec!r} selects no head")
    return out
