"""Settings: one flat dataclass; each setting declared once, with its type, default and help.

Precedence: defaults < the model card's `settings` < `--config FILE.yaml` < `--set KEY=VALUE`
< flags. YAML and `--set` keys are the setting names (`segment: 512`, `xl-cache: false`; `_` and
`-` both accepted). The CLI builds its flags from these declarations (`cli/options.py`): the
everyday ones as flags, every setting through `--set`. The merged settings are what banks
record, so a bank says exactly how it was built. Why each default is what it is, with the
numbers that chose it: docs/decisions.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memtx_cli.errors import UsageError

CONTEXT_MODES = ("window", "full")
COMBINE_MODES = ("joint", "gate")
POSITION_SCHEMES = ("fixed", "true", "clamped")
RETRIEVAL_MODES = ("token", "block")
BLOCK_SELECT = ("auto", "exact", "means")
ANSWER_MODES = ("quote", "copy", "free")

INPUT, MEMORY, RUNTIME = "Input", "Memory", "Model and runtime"


def knob(default: Any, help: str, panel: str = MEMORY, flag: str = "") -> Any:
    """A setting's declaration: default, help text, --help panel and (if not --name) its flag."""
    return field(default=default, metadata={"help": help, "panel": panel, "flag": flag})


@dataclass
class Config:
    model: str = knob("smollm2-135m", "Model card name or path to a .gguf file / HF directory.", RUNTIME, "--model/-m")
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda[:N].", RUNTIME)
    dtype: str = knob("auto", "auto (bfloat16 where the hardware has it), float32, bfloat16.", RUNTIME)
    threads: int = knob(0, "CPU threads; 0 = one per core.", RUNTIME)
    segment: int = knob(512, "Segment length in tokens (the paper's 512).", INPUT)
    xl_cache: bool = knob(True, "Attend to the previous segment too (Transformer-XL cache).", INPUT)
    context: str = knob(
        "window",
        "window (segments + XL cache + memory) or full (causal attention up to the trained context).",
        INPUT,
    )
    max_tokens: int = knob(0, "Score only the first N tokens; 0 = the whole document.", INPUT)
    memory: bool = knob(True, "kNN memory of everything that left the XL cache.", flag="--memory/--no-memory")
    memory_layers: str = knob("auto", "Memory layers: auto (upper half), all, 8,16,24 or 10-19.")
    memory_heads: str = knob(
        "all",
        "KV heads with memory: all, topN (the card's ranking), topqN (query heads) or 18.2,8.0; "
        "18.2:224,8.0:32 gives heads block budgets of their own.",
    )
    head_ranking: str = knob("", "KV heads ranked by their need for memory, best first (the card's).")
    query_head_ranking: str = knob("", "The same per query head (layer.query_head), for topqN.")
    top_k: int = knob(32, "token retrieval: memories retrieved per query (the paper's 32).")
    index: str = knob("ivf", "token retrieval: flat (exact), ivf, hnsw or a FAISS factory string.")
    nprobe: int = knob(48, "IVF lists searched per query (of 128).")
    combine: str = knob("joint", "joint (one softmax over local + memory) or gate (the paper's sigmoid gate).")
    gate_init: float = knob(0.0, "Initial gate bias b (g = sigmoid(b)).")
    positions: str = knob(
        "fixed", "Memory positions: fixed, true or clamped (true within the trained context, fixed beyond)."
    )
    far_layers: str = knob("all", "clamped: layers whose memory heads also read beyond the trained context.")
    far_blocks: int = knob(-1, "clamped: blocks older than the trained context (-1 = share `blocks`).")
    far_bias: float = knob(0.0, "clamped, with far-blocks / far-top-k: a prior subtracted from their scores.")
    far_top_k: int = knob(0, "clamped block retrieval: each query's own top-k memories beyond the trained context.")
    far_heads: str = knob("all", "far-top-k: the KV heads that read the far past (layer.head pairs) or all.")
    far_scope: str = knob(
        "beyond",
        "far-top-k reads among: beyond (memories older than the trained context) or all (every "
        "memory, near ones too, at the fixed distance: recall of what the blocks miss).",
    )
    recall_heads: str = knob(
        "",
        "far-top-k: KV heads that retrieve and copy (layer.head pairs, the card's from "
        "benchmarks/retrieval_heads.py); their own reads carry no far-bias.",
    )
    far_pages: int = knob(
        0,
        "far-top-k and answer-top-k: search only the blocks whose score bound (per-channel key "
        "min/max, Quest) is among some query's best N, exactly within them; 0 = every memory.",
    )
    answer_top_k: int = knob(
        0,
        "clamped block retrieval: answering tokens (a prompt's last few, each generated one) also read "
        "their own top-k among every memory, in every memory head, at the fixed distance, no prior.",
    )
    answer_pages: int = knob(
        0,
        "answer-top-k: answering tokens search the document's own past only within pages: the union of "
        "their N best blocks each by a score bound (per-channel key min/max, Quest), exactly within "
        "them; 0 = every memory (far-pages then applies).",
    )
    answer_bank: bool = knob(
        False, "answer-top-k: the answering tokens' own reads also search the bank (no prior), beside its blocks."
    )
    answer_tokens: int = knob(
        0, "answer-top-k: how many of a prompt's last tokens read as answering tokens; 0 = all of them."
    )
    answer_mode: str = knob(
        "quote",
        "ask with quoted sources: quote (the lines of the quoted text the question's tokens attend to "
        "most in the quote-heads, as written), copy (decoded, every token continuing a span of the "
        "quoted text) or free (decoded freely).",
    )
    quote_heads: str = knob(
        "", "answer-mode quote: the query heads (layer.query_head) whose attention picks the lines (the card's)."
    )
    quote_lines: int = knob(3, "answer-mode quote: lines quoted, from the one picked on, within its excerpt.")
    mem_distance: int = knob(
        0, "fixed: distance memories sit at; clamped: the cap or where far memories sit. 0 = auto."
    )
    shared_search: bool = knob(True, "One search per token for a GQA group (the sum of its queries).")
    retrieval: str = knob("block", "token: each query's own top-k (the paper); block: chunks pick whole blocks.")
    block_size: int = knob(32, "block retrieval: tokens per block.")
    blocks: int = knob(64, "block retrieval: blocks attended per query chunk and KV head.")
    block_spread: int = knob(0, "block retrieval: a block inherits the relevance of this many before it.")
    block_chunk: int = knob(64, "block retrieval: queries that pick their blocks together.")
    block_votes: int = knob(
        0, "block retrieval: the last N tokens of the previous chunk vote for blocks (0 = summed queries)."
    )
    block_select: str = knob(
        "auto", "clamped with voters: exact (best key's logit), means (mean key) or auto (exact where it applies)."
    )
    bank_heads: str = knob(
        "all", "The KV heads (layer.head pairs) a new bank stores and reads, among the memory heads; all = every one."
    )
    bank_blocks: int = knob(16, "Blocks read from a bank per query chunk, besides the document's own.")
    bank_bias: float = knob(2.0, "Subtracted from bank memories' attention scores (a prior).")
    bank_words: int = knob(
        4,
        "Bank blocks a generation's prompt pins by its words (BM25 over the bank's words): every chunk "
        "reads them beside the blocks it searches; 0 = none.",
    )
    pin_bias: float = knob(0.0, "Added to the attention scores of the bank blocks a prompt's words pinned.")
    sinks: int = knob(4, "First tokens of the document kept visible in every window (StreamingLLM).")
    sink_positions: str = knob(
        "auto",
        "Where sinks sit: window, real (their distance, capped) or auto (real when reading with true or "
        "clamped positions; window when writing a bank, whose entries are read at the fixed distance).",
    )

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
        if self.answer_top_k < 0 or self.answer_tokens < 0 or self.far_pages < 0 or self.answer_pages < 0:
            raise UsageError("answer-top-k, answer-tokens, answer-pages and far-pages must be >= 0")
        if self.answer_mode not in ANSWER_MODES:
            raise UsageError(f"answer-mode must be one of {', '.join(ANSWER_MODES)}, got {self.answer_mode!r}")
        if self.quote_lines < 1:
            raise UsageError(f"quote-lines must be >= 1, got {self.quote_lines}")
        if self.far_scope not in ("beyond", "all"):
            raise UsageError(f"far-scope must be beyond or all, got {self.far_scope!r}")
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
        if self.bank_blocks < 1 or self.bank_bias < 0 or self.bank_words < 0 or not math.isfinite(self.pin_bias):
            raise UsageError("bank-blocks must be >= 1, bank-bias and bank-words >= 0, pin-bias a number")
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

    def memory_settings(self) -> dict[str, Any]:
        """The settings that shape memory (what a bank records)."""
        return {k: getattr(self, k) for k in MEMORY_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS_HELP = {f.name: f.metadata["help"] for f in fields(Config)}
MEMORY_KEYS = tuple(f.name for f in fields(Config) if f.metadata["panel"] == MEMORY) + ("segment", "xl_cache")


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
    """Merge dicts left to right (later wins; None values are skipped) into a checked Config."""
    return merge_sources([(str(n), layer) for n, layer in enumerate(layers)])[0]


def merge_sources(layers: list[tuple[str, dict[str, Any] | None]]) -> tuple[Config, dict[str, str]]:
    """Named layers, merged left to right, -> the checked Config and where each setting came
    from ("default" or the layer's name). `blocks` set in a later layer than per-head budgets
    (memory-heads "18.2:224,...", the card's) overrides them: the same heads, each reading `blocks`."""
    known = {f.name: f for f in fields(Config)}
    merged: dict[str, Any] = {}
    where: dict[str, int] = {}  # key -> the layer that set it
    for n, (_, layer) in enumerate(layers):
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
    sources = {k: layers[where[k]][0] if k in where else "default" for k in known}
    return Config(**merged), sources


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> a settings layer (`block-votes=8`, `xl-cache=false`)."""
    out: dict[str, Any] = {}
    known = {f.name for f in fields(Config)}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = _norm_key(key.strip())
        if not eq or not key:
            raise UsageError(f"--set {item!r}: use KEY=VALUE, e.g. --set block-votes=8")
        if key not in known:
            raise UsageError(f"--set {item!r}: unknown setting {key!r} (memtx config show lists them)")
        out[key] = value.strip()  # checked and converted as every other layer's values
    return out


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
