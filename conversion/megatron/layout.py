"""Megatron key names -> canonical tensors, tensor-parallel merges, and the jaxformer layout.

MEGATRON_FORMAT.md §2 (names), §3 (QKV orders), §4 (TP partitions). Every naming scheme
(legacy 2019 -> 2024, megatron-core TE and local specs, legacy-TE, torch_dist) maps onto one
set of canonical names; the merge of a canonical tensor depends only on its partition kind
and the checkpoint version. Shapes are torch's [out, in] until `to_jaxformer`.

Canonical layer tensors: attn_norm.{w,b} qkv.{w,b} proj.{w,b} mlp_norm.{w,b} fc1.{w,b} fc2.{w,b};
mixtures of experts (megatron-core MoE): router.w [E, D], experts.<e>.fc1.w and
experts.<e>.fc2.w per global expert e (source.py renames every expert layout to
`mlp.experts.<e>.fc1.weight` first), shared_fc1.w shared_fc2.w shared_gate.w
Canonical globals: word_emb pos_emb type_emb final_norm.{w,b} output.w head_copy.w lm_dense.{w,b}
lm_norm.{w,b} lm_bias pooler.{w,b} binary.{w,b}
"""
from __future__ import annotations

import re

import numpy as np

from conversion.megatron.errors import fail

WB = {"weight": "w", "bias": "b", "layer_norm_weight": "w", "layer_norm_bias": "b"}

# (suffix regex within a layer, canonical prefix); group "wb" is weight|bias
_LAYER_RULES = [
    (r"(?:input_layernorm|input_norm)\.(?P<wb>weight|bias)", "attn_norm"),
    (r"self_attention\.(?:linear_qkv|layernorm_qkv)\.layer_norm_(?P<wb>weight|bias)", "attn_norm"),
    (r"(?:attention|self_attention)\.query_key_value\.(?P<wb>weight|bias)", "qkv"),
    (r"self_attention\.(?:linear_qkv|layernorm_qkv)\.(?P<wb>weight|bias)", "qkv"),
    (r"(?:attention|self_attention)\.dense\.(?P<wb>weight|bias)", "proj"),
    (r"self_attention\.(?:linear_proj|proj)\.(?P<wb>weight|bias)", "proj"),
    (r"(?:post_attention_layernorm|post_attention_norm|pre_mlp_layernorm)\.(?P<wb>weight|bias)",
     "mlp_norm"),
    (r"(?:mlp\.linear_fc1|layernorm_mlp)\.layer_norm_(?P<wb>weight|bias)", "mlp_norm"),
    (r"mlp\.(?:dense_h_to_4h|linear_fc1)\.(?P<wb>weight|bias)", "fc1"),
    (r"layernorm_mlp\.fc1_(?P<wb>weight|bias)", "fc1"),
    (r"mlp\.(?:dense_4h_to_h|linear_fc2)\.(?P<wb>weight|bias)", "fc2"),
    (r"layernorm_mlp\.fc2_(?P<wb>weight|bias)", "fc2"),
    (r"self_attention\.q_layernorm\.(?P<wb>weight|bias)", "q_norm"),  # --qk-layernorm
    (r"self_attention\.k_layernorm\.(?P<wb>weight|bias)", "k_norm"),
    (r"mlp\.router\.(?P<wb>weight)", "router"),  # megatron-core MoE
    (r"mlp\.shared_experts\.linear_fc1\.(?P<wb>weight)", "shared_fc1"),
    (r"mlp\.shared_experts\.linear_fc2\.(?P<wb>weight)", "shared_fc2"),
    (r"mlp\.shared_experts\.gate_(?P<wb>weight)", "shared_gate"),
]
_EXPERT_RULE = re.compile(r"mlp\.experts\.(?P<e>\d+)\.(?P<fc>fc1|fc2)\.weight$")
_LAYER_RULES = [(re.compile(p + "$"), c) for p, c in _LAYER_RULES]

_UNSUPPORTED_LAYER = [
    (re.compile(r"mlp\.local_experts\.|mlp\.router\.bias"),
     "the legacy SwitchMLP (top-1 sigmoid routing with a router bias)"),
    (re.compile(r"mlp\.router\.expert_bias"),
     "MoE expert-bias (aux-loss-free, sigmoid) routing"),
    (re.compile(r"mlp\.experts\.(local_experts|weight\d|linear_fc\d)"),
     "MoE experts outside per-rank torch files (torch_dist)"),
    (re.compile(r"(inter_attention|cross_attention|pre_cross_attn_layernorm|"
                r"post_inter_attention_layernorm)\."), "encoder-decoder (T5) cross attention"),
]

_GLOBAL_RULES = [
    (r"embedding\.word_embeddings\.weight", "word_emb"),
    (r"embedding\.position_embeddings\.weight", "pos_emb"),
    (r"embedding\.tokentype_embeddings\.weight", "type_emb"),
    (r"(?:transformer|encoder|decoder)\.final_(?:layernorm|norm)\.(?P<wb>weight|bias)",
     "final_norm"),
    (r"output_layer\.weight", "output.w"),
    (r"output_layer\.bias", "lm_bias"),  # megatron-core BERT keeps the MLM bias here
    (r"word_embeddings_for_head\.weight", "head_copy.w"),
    (r"lm_head\.dense\.(?P<wb>weight|bias)", "lm_dense"),
    (r"lm_head\.(?:layernorm|layer_norm)\.(?P<wb>weight|bias)", "lm_norm"),
    (r"lm_head\.norm\.(?P<wb>weight|bias)", "lm_norm1p"),  # get_norm(): honours layernorm_1p
    (r"lm_head\.bias", "lm_bias"),
    (r"pooler\.dense\.(?P<wb>weight|bias)", "pooler"),
    (r"binary_head\.(?P<wb>weight|bias)", "binary"),
]
_GLOBAL_RULES = [(re.compile(p + "$"), c) for p, c in _GLOBAL_RULES]

_SKIP = re.compile(r"(_extra_state$|\.inv_freq$|rotary_pos_emb\.|\._amax|\.scale_inv$)")
_LAYER_KEY = re.compile(r"^(?:transformer|encoder|decoder)\.layers\.(?:(?P<i>\d+)\.)?(?P<rest>.+)$")

# partition kind of each canonical tensor (§4)
PARTITION = {
    "word_emb": "vocab", "output.w": "vocab", "head_copy.w": "vocab", "lm_bias": "vocab",
    "qkv.w": "qkv", "qkv.b": "qkv", "fc1.w": "fc1", "fc1.b": "fc1",
    "proj.w": "row", "fc2.w": "row",
}


def partition(canon: str) -> str:
    if canon.startswith("experts.") or canon.startswith("shared_fc"):  # each a TP-split MLP
        return "fc1" if canon.endswith("fc1.w") else "row"
    return PARTITION.get(canon, "rep")


def expert_of(canon: str) -> int | None:
    """The global expert number of an expert tensor's canonical name, else None."""
    return int(canon.split(".")[1]) if canon.startswith("experts.") else None


def strip_prefix(key: str) -> str:
    for p in ("language_model.",):
        if key.startswith(p):
            return key[len(p):]
    return key


def classify(key: str, where) -> tuple[str, int | None, str | None]:
    """key (flattened, no model prefix) -> ("layer", local index or None, canon) |
    ("global", None, canon) | ("skip", None, None). Raises on unknown keys."""
    k = strip_prefix(key)
    if _SKIP.search(k):
        return "skip", None, None
    m = _LAYER_KEY.match(k)
    if m:
        rest = m.group("rest")
        for pat, why in _UNSUPPORTED_LAYER:
            if pat.match(rest):
                raise fail(f"{why} is not supported by jaxformer", where, key)
        mm = _EXPERT_RULE.match(rest)
        if mm:
            return "layer", None if m.group("i") is None else int(m.group("i")), \
                f"experts.{int(mm.group('e'))}.{mm.group('fc')}.w"
        for pat, canon in _LAYER_RULES:
            mm = pat.match(rest)
            if mm:
                i = m.group("i")
                return "layer", None if i is None else int(i), f"{canon}.{WB[mm.group('wb')]}"
        raise fail("unknown layer key (not a Megatron GPT/BERT parameter this converter knows)",
                   where, key)
    for pat, canon in _GLOBAL_RULES:
        mm = pat.match(k)
        if mm:
            if "wb" in pat.groupindex:
                canon = f"{canon}.{WB[mm.group('wb')]}"
            return "global", None, canon
    raise fail("unknown key (not a Megatron GPT/BERT parameter this converter knows)",
               where, key)


def flatten(tree, prefix="") -> dict:
    """Nested dicts of the legacy format -> {'a.b.c': leaf}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


# ---- tensor-parallel merge -------------------------------------------------------------------
def merge(canon: str, pieces: list[np.ndarray], *, version: float, gated: bool,
          head_dim: int) -> np.ndarray:
    """TP pieces (rank order) of a per-rank torch file -> the global tensor. QKV comes out in
    the per-group layout [(K, G+2, H) rows, ...] whatever the version; fc1 of a gated MLP as
    [W_all; V_all] (each rank holds [W_r; V_r])."""
    kind = partition(canon)
    if kind == "rep":
        return pieces[0]
    if kind == "row":
        return np.concatenate(pieces, axis=1) if pieces[0].ndim == 2 else pieces[0]
    if kind == "vocab":
        return np.concatenate(pieces, axis=0)
    if kind == "fc1":
        if not gated:
            return np.concatenate(pieces, axis=0)
        halves = [np.split(p, 2, axis=0) for p in pieces]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    if kind == "qkv":
        if version == 0:  # strided: each rank (3, np_r, hn); merge the q, k, v blocks apart
            blocks = [p.reshape((3, -1) + p.shape[1:]) for p in pieces]
            w = np.concatenate(blocks, axis=1)
            w = w.reshape((-1,) + w.shape[2:])
        else:
            w = np.concatenate(pieces, axis=0)
        return qkv_to_v2(w, version, head_dim)
    raise AssertionError(kind)


def qkv_to_v2(w: np.ndarray, version: float, hn: int) -> np.ndarray:
    """QKV rows of versions 0 / 1.0 -> the per-head (np, 3, hn) order of 2.0+ (§3)."""
    if version >= 2:
        return w
    rest = w.shape[1:]
    if version == 0:  # (3, np, hn)
        w = w.reshape((3, -1, hn) + rest).swapaxes(0, 1)
    else:  # 1.0: (np, hn, 3)
        w = w.reshape((-1, hn, 3) + rest).swapaxes(1, 2)
    return np.ascontiguousarray(w).reshape((-1,) + rest)


# ---- jaxformer layout -----------------------------------------------------------------------
def to_jaxformer(canon: str, a: np.ndarray, *, K: int, G: int, H: int, N: int, D: int,
                 F: int, gated: bool) -> tuple[str, np.ndarray]:
    """A merged layer tensor -> (jaxformer path under layers/, array without the L axis)."""
    if canon == "attn_norm.w":
        return "attn_norm/scale", a
    if canon == "attn_norm.b":
        return "attn_norm/bias", a
    if canon == "mlp_norm.w":
        return "mlp_norm/scale", a
    if canon == "mlp_norm.b":
        return "mlp_norm/bias", a
    if canon in ("q_norm.w", "k_norm.w", "q_norm.b", "k_norm.b"):  # [H], over each head
        which, wb = canon.split(".")
        return f"attn/{which}/{'scale' if wb == 'w' else 'bias'}", a
    if canon == "qkv.w":  # [(K, G+2, H) rows, D] -> [D, K, G+2, H]
        return "attn/qkv/kernel", a.reshape(K, G + 2, H, D).transpose(3, 0, 1, 2)
    if canon == "qkv.b":
        return "attn/qkv/bias", a.reshape(K, G + 2, H)
    if canon == "proj.w":  # [D, N*H] -> [N, H, D]
        return "attn/out/kernel", a.T.reshape(N, H, D)
    if canon == "proj.b":
        return "attn/out/bias", a
    if canon == "fc1.w":
        if gated:  # [2F, D] = [gate; up] -> [D, 2, F]
            return "mlp/wi/kernel", a.reshape(2, F, D).transpose(2, 0, 1)
        return "mlp/wi/kernel", a.T
    if canon == "fc1.b":
        return "mlp/wi/bias", a.reshape(2, F) if gated else a
    if canon == "fc2.w":
        return "mlp/wo/kernel", a.T
    if canon == "fc2.b":
        return "mlp/wo/bias", a
    if canon == "router.w":  # [E, D] -> [D, E]
        return "mlp/router", a.T
    if canon == "shared_gate.w":  # [1, D] -> [D, 1]
        return "mlp/shared_gate", a.T
    if canon.startswith(("experts.", "shared_fc")):  # one expert's MLP, F from its shape
        sub = "mlp/shared" if canon.startswith("shared") else "mlp"
        if canon.endswith("fc1.w"):
            if gated:  # [2F, D] = [gate; up] -> [D, 2, F]
                return f"{sub}/wi/kernel", a.reshape(2, -1, D).transpose(2, 0, 1)
            return f"{sub}/wi/kernel", a.T
        return f"{sub}/wo/kernel", a.T  # [D, F] -> [F, D]
    raise AssertionError(canon)


LAYER_CANONS = ("attn_norm.w", "attn_norm.b", "qkv.w", "qkv.b", "proj.w", "proj.b",
                "mlp_norm.w", "mlp_norm.b", "fc1.w", "fc1.b", "fc2.w", "fc2.b",
                "q_norm.w", "q_norm.b", "k_norm.w", "k_norm.b",
                "router.w", "shared_fc1.w", "shared_fc2.w", "shared_gate.w")


def expert_canons(num_experts: int) -> tuple[str, ...]:
    return tuple(f"experts.{e}.{fc}.w" for e in range(num_experts) for fc in ("fc1", "fc2"))


# ---- megatron-core expert layouts -> one name per global expert -----------------------------
_SEQUENTIAL = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)local_experts\.(?P<j>\d+)\."
                         r"linear_(?P<fc>fc1|fc2)\.weight$")
_TE_GROUPED = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)linear_(?P<fc>fc1|fc2)\.weight(?P<j>\d+)$")
_GROUPED = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)weight(?P<n>[12])$")
_EXPERT_EXTRA = re.compile(r"\.mlp\.experts\..*_extra_state$")


class ExpertSlice:
    """Expert j of a grouped-GEMM weight (megatron-core GroupedMLP), read when asked:
    weight1 [D, El * X] is viewed [El, D, X] (fc1 of expert j: [X, D] after .T) and weight2
    [El * F, D] is viewed [El, F, D] (fc2: [D, F]), as GroupedMLP.forward views them."""

    def __init__(self, parent, j: int, experts: int, which: str):
        self.parent, self.j, self.El, self.which = parent, j, experts, which
        rows, cols = parent.shape
        self.dtype = parent.dtype
        self.shape = (cols // experts, rows) if which == "fc1" else (rows // experts, cols)[::-1]

    def numpy(self) -> np.ndarray:
        a = self.parent.numpy()
        if self.which == "fc1":
            return np.ascontiguousarray(a.reshape(self.El, a.shape[0], -1)[self.j].T)
        return np.ascontiguousarray(a.reshape(self.El, -1, a.shape[1])[self.j].T)


def canonical_experts(flat: dict, first: int, experts: int | None, where) -> dict:
    """One rank's flat state dict with every megatron-core expert layout renamed to
    `<layer>.mlp.experts.<first + j>.fc{1,2}.weight` (j its local expert); `experts` local
    experts per rank (from the args; needed to split grouped-GEMM weights)."""
    out = {}
    for key, v in flat.items():
        if _EXPERT_EXTRA.search(key):
            continue
        m = _SEQUENTIAL.match(key) or _TE_GROUPED.match(key)
        if m:
            out[f"{m.group('pre')}{first + int(m.group('j'))}.{m.group('fc')}.weight"] = v
            continue
        m = _GROUPED.match(key)
        if m:
            if not experts:
                raise fail("grouped-GEMM expert weights need args.num_experts", where, key)
            fc = "fc1" if m.group("n") == "1" else "fc2"
            for j in range(experts):
                out[f"{m.group('pre')}{first + j}.{fc}.weight"] = ExpertSlice(v, j, experts, fc)
            continue
        out[key] = v
    return out
